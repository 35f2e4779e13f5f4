"""The storage under ``PrefixIndex``: ``hash -> slot bitmask``, kept prefix-closed per worker.

Layout: ``holders`` maps a block hash to an int bitmask of worker slots, in LRU order (oldest
first). References beyond the first (a worker storing the same hash twice) are counted in
``extra``, keyed ``slot << 64 | hash``, empty in the common case. Stores are done with C-level
bulk dict operations (pop every hash, or the slot bit in, re-insert): no Python per block.

Prefix closure (what lets ``index_match.resolve`` binary-search): a worker's bit is on a hash
only if it is on the hash's parent too. Links ``parent -> children`` come from stored events
(each event is a chain, its first block's parent is ``KvEvent.parent``), and
- a chain stored under a parent the worker does not hold is skipped (``orphan_blocks``): the
  linear walk could never reach it for that worker anyway;
- when a worker loses a hash (``removed``), its bit is also cleared from the linked
  descendants it holds (``cascaded_blocks``): every walk's answer stays what it was (a walk
  stops at the missing block), and the map stays free of holes;
- the LRU cap evicts leaves only (hashes with no indexed child), so it never makes a hole.
  Chains are inserted deepest first and match walks re-touch root last, so the oldest
  entries are mostly leaves already.
Snapshot hashes come without links: ``store_unlinked`` marks the worker ``unlinked`` and
matching falls back to the linear walk for it until its entries are swept (new epoch, cleared).

Bounds: at most ``max_blocks`` hashes; past it the least recently used leaves are evicted
``max_blocks // 64`` at a time (amortised O(1)). Links exist only for
indexed parents (dropped with them); a parent's extra children set is pruned of unindexed
members whenever its size reaches a power of two (>= 64), so it stays O(indexed children).
"""

from __future__ import annotations

from collections import Counter
from functools import reduce
from itertools import compress, islice, repeat
from operator import and_, ne, not_, or_


class HolderMap:
    """See module doc. Pure data structure; ``counters`` is shared with the owning index."""

    def __init__(self, max_blocks: int, counters: dict[str, int]) -> None:
        self.max_blocks = max_blocks
        self.evict_chunk = max(1, max_blocks // 64)
        self.counters = counters
        self.holders: dict[int, int] = {}
        self.extra: dict[int, int] = {}
        self.kid: dict[int, int] = {}  # parent -> first child seen
        self.kids: dict[int, set[int]] = {}  # parent -> further children
        self.held: list[int] = []  # slot -> distinct hashes held
        self.unlinked = 0  # slots holding snapshot entries (no links: not prefix-closed)

    def add_slot(self, slot: int) -> None:
        while len(self.held) <= slot:
            self.held.append(0)
        self.held[slot] = 0

    # --- store ------------------------------------------------------------------------------------
    def store(self, slot: int, hashes: list[int], parent: int | None) -> int:
        """A worker stored the chain ``hashes`` under ``parent`` (None: from the root)."""
        holders, bit = self.holders, 1 << slot
        room = self.max_blocks - len(holders) - len(hashes)
        if room < 0:
            self.evict(-room + self.evict_chunk - 1)
        if parent is not None and not holders.get(parent, 0) & bit:
            self.counters["orphan_blocks"] += len(hashes)
            return 0
        old = self._set(slot, bit, hashes)
        if parent is None:
            if len(hashes) > 1:
                self._link(hashes[:-1], hashes[1:], old[1:])
        else:
            self._link([parent, *hashes[:-1]], hashes, old)
        return len(hashes)

    def store_unlinked(self, slot: int, hashes: list[int]) -> int:
        """Snapshot entries: no chain order, no links (see module doc)."""
        room = self.max_blocks - len(self.holders) - len(hashes)
        if room < 0:
            self.evict(-room + self.evict_chunk - 1)
        if hashes:
            self.unlinked |= 1 << slot
            self._set(slot, 1 << slot, hashes)
        return len(hashes)

    def _set(self, slot: int, bit: int, hashes: list[int]) -> list[int]:
        """Or ``bit`` into every hash (C-level bulk ops); returns the masks they had."""
        holders = self.holders
        before = len(holders)
        # re-inserted below as the most recent, deepest first: leaves are evicted before their
        # ancestors; a hash listed twice pops 0 the second time (caught by ``distinct``)
        old = list(map(holders.pop, hashes, repeat(0)))
        base = len(holders)
        holders.update(zip(reversed(hashes), map(or_, reversed(old), repeat(bit))))
        distinct = len(holders) - base
        if distinct != len(hashes):
            return self._set_repeats(slot, bit, hashes, old)
        if before != base and reduce(or_, old) & bit:  # stored again: count the references
            extra, shifted = self.extra, slot << 64
            again = list(compress(hashes, map(and_, old, repeat(bit))))
            for h in again:
                extra[shifted | h] = extra.get(shifted | h, 0) + 1
            distinct -= len(again)
        self.held[slot] += distinct
        return old

    def _set_repeats(self, slot: int, bit: int, hashes: list[int], old: list[int]) -> list[int]:
        """A hash listed twice in one chain (rare): redo the masks and count the references."""
        holders, extra, shifted = self.holders, self.extra, slot << 64
        first: dict[int, int] = {}
        for h, m in zip(hashes, old):
            first.setdefault(h, m)
        new = 0
        for h, m in first.items():
            holders[h] = m | bit
            if m & bit:
                extra[shifted | h] = extra.get(shifted | h, 0) + 1
            else:
                new += 1
        for h, refs in Counter(hashes).items():
            if refs > 1:
                extra[shifted | h] = extra.get(shifted | h, 0) + refs - 1
        self.held[slot] += new
        return [first[h] for h in hashes]

    def _link(self, parents: list[int], children: list[int], was: list[int]) -> None:
        """Record ``parent -> child`` for each pair. A child that was indexed already is linked
        already (chained hashes: a hash has one parent), unless snapshot entries exist."""
        if not self.unlinked:
            fresh = list(map(not_, was))
            parents, children = list(compress(parents, fresh)), list(compress(children, fresh))
            if not children:
                return
        kid = self.kid
        got = list(map(kid.setdefault, parents, children))
        if got != children:  # a parent with another child already: the rare, Python path
            kids = self.kids
            for p, c in compress(zip(parents, children), map(ne, got, children)):
                s = kids.get(p)
                if s is None:
                    kids[p] = {c}
                elif c not in s:
                    s.add(c)
                    n = len(s)
                    if n >= 64 and not n & (n - 1):
                        live = {x for x in s if x in self.holders}
                        kids[p] = live if live else {c}

    def children(self, h: int) -> list[int]:
        c = self.kid.get(h)
        if c is None:
            return []
        more = self.kids.get(h)
        return [c, *more] if more else [c]

    # --- remove ------------------------------------------------------------------------------------
    def remove(self, slot: int, hashes: list[int]) -> int:
        """A worker dropped ``hashes`` (one reference each); clears its linked descendants too."""
        holders, extra = self.holders, self.extra
        get = holders.get
        bit, shifted = 1 << slot, slot << 64
        for h in hashes:
            m = get(h, 0)
            if not m & bit:
                self.counters["unknown_removes"] += 1  # evicted by our cap, never seen, or cascaded
                continue
            if extra:
                key = shifted | h
                refs = extra.get(key)
                if refs is not None:
                    if refs > 1:
                        extra[key] = refs - 1
                    else:
                        del extra[key]
                    continue
            below = self.children(h)
            self._drop(h, m, bit, slot)
            if below:
                self._clear_below(below, bit, slot)
        return len(hashes)

    def _drop(self, h: int, m: int, bit: int, slot: int) -> None:
        m ^= bit
        if m:
            self.holders[h] = m
        else:
            del self.holders[h]
            self.kid.pop(h, None)
            self.kids.pop(h, None)
        self.held[slot] -= 1

    def _clear_below(self, stack: list[int], bit: int, slot: int) -> None:
        """Clear ``bit`` from the hashes in ``stack`` and their linked descendants (refs included)."""
        holders, extra, shifted = self.holders, self.extra, slot << 64
        n = 0
        while stack:
            c = stack.pop()
            m = holders.get(c, 0)
            if m & bit:
                below = self.children(c)
                if extra:
                    extra.pop(shifted | c, None)
                self._drop(c, m, bit, slot)
                stack.extend(below)
                n += 1
        self.counters["cascaded_blocks"] += n

    # --- eviction and sweeps ------------------------------------------------------------------------
    def evict(self, n: int) -> None:
        """Drop the ``n`` least recently used *leaves* (hashes with no indexed child).

        An inner hash met among the oldest is moved to the recent end instead (its children
        are newer: evicting it would orphan them), so eviction never leaves a hole. Each scan
        looks at every hash at most once; a forest always has leaves, so it finds them.
        """
        holders = self.holders
        gone = scanned = 0
        budget = len(holders)
        while gone < n and holders and scanned < budget:
            batch = list(islice(holders, min(n - gone + 16, budget - scanned)))
            scanned += len(batch)
            for h in batch:
                m = holders.pop(h)
                if self._has_child(h):
                    holders[h] = m  # moved to the recent end
                    continue
                self.kid.pop(h, None)
                self.kids.pop(h, None)
                self._unhold(h, m)
                gone += 1
                if gone >= n:
                    break
        self.counters["evictions"] += gone

    def _has_child(self, h: int) -> bool:
        c = self.kid.get(h)
        if c is None:
            return False
        holders = self.holders
        if c in holders:
            return True
        more = self.kids.get(h)
        return bool(more) and any(x in holders for x in more)

    def _unhold(self, h: int, m: int) -> None:
        held, extra = self.held, self.extra
        while m:
            low = m & -m
            slot = low.bit_length() - 1
            m ^= low
            held[slot] -= 1
            if extra:
                extra.pop(slot << 64 | h, None)

    def sweep(self, slot: int) -> None:
        """Drop every entry of one worker: O(indexed blocks)."""
        bit, keep = 1 << slot, ~(1 << slot)
        holders = self.holders
        emptied = []
        for h, m in holders.items():
            if m & bit:
                m &= keep
                if m:
                    holders[h] = m
                else:
                    emptied.append(h)
        for h in emptied:
            del holders[h]
            self.kid.pop(h, None)
            self.kids.pop(h, None)
        if self.extra:
            for k in [k for k in self.extra if k >> 64 == slot]:
                del self.extra[k]
        self.held[slot] = 0
        self.unlinked &= keep

    def slot_hashes(self, slot: int) -> list[int]:
        """Every hash a slot holds, a hash held twice listed twice."""
        bit = 1 << slot
        out = [h for h, m in self.holders.items() if m & bit]
        for key, refs in self.extra.items():
            if key >> 64 == slot:
                out.extend([key & ((1 << 64) - 1)] * refs)
        return out
