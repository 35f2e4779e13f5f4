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

Interface (shared with ``kvrelay.router._holders.HolderTable``, the C implementation of this
same structure that ``PrefixIndex`` uses when it is built; this class is its reference, and the
tests drive both with the same operations and compare everything observable): hashes arrive
packed (little-endian uint64 bytes, as on the wire) in ``store`` / ``store_unlinked`` /
``remove``; ``match`` / ``match_linear`` answer for the slots set by ``set_usable``.

Links: a chain store links each of its hashes to the one before it (the first to ``parent``)
unless that hash is linked already (a chained hash has one parent; the first link stays).
Links join indexed hashes only: a hash that leaves the map leaves its links with it (``up``
maps child -> parent for that), so "has an indexed child" is just "has a link down".
A broken or hostile worker cannot make blocks eviction never removes: a chain that repeats a
hash (its parent included) is refused whole (``bad_chains``), and a link that would close a
cycle (contradicting chains) is refused (``refused_links``). A store first makes its parent the
most recent and eviction skips it, so the cap never cuts off the block a chain continues from.

Bounds: at most ``max_blocks`` hashes; past it the least recently used leaves are evicted
``max_blocks // 64`` at a time (amortised O(1)). Links: at most one up-link per indexed hash.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import reduce
from itertools import compress, islice, repeat
from operator import and_, eq, ne, not_, or_
from sys import getsizeof

from kvrelay.router.index_match import resolve, walk
from kvrelay.schemas.kv_events import unpack_hashes

MAX_ANCESTRY = 65536  # longest parent chain walked to refuse a cycle (longer: refused too), as in C


class HolderMap:
    """See module doc. Pure data structure; ``counters`` is shared with the owning index."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.evict_chunk = max(1, max_blocks // 64)
        self.counters = dict.fromkeys(("orphan_blocks", "evictions", "unknown_removes", "cascaded_blocks",
                                       "bad_chains", "refused_links"), 0)
        self.holders: dict[int, int] = {}
        self.extra: dict[int, int] = {}
        self.kid: dict[int, int] = {}  # parent -> a linked child
        self.kids: dict[int, set[int]] = {}  # parent -> its other linked children
        self.up: dict[int, int] = {}  # child -> linked parent
        self._held: list[int] = []  # slot -> distinct hashes held
        self.unlinked = 0  # slots holding snapshot entries (no links: not prefix-closed)
        self.usable = 0  # slots match may report

    def add_slot(self, slot: int) -> None:
        while len(self._held) <= slot:
            self._held.append(0)
        self._held[slot] = 0

    def set_usable(self, mask: int) -> None:
        self.usable = mask

    def held(self, slot: int) -> int:
        return self._held[slot] if slot < len(self._held) else 0

    def counts(self) -> dict[str, int]:
        return dict(self.counters)

    def __len__(self) -> int:
        return len(self.holders)

    def get(self, h: int) -> int:
        return self.holders.get(h, 0)

    # --- match ------------------------------------------------------------------------------------
    def match(self, hashes: Sequence[int]) -> list[tuple[int, int]]:
        """``[(slot bitmask, leading blocks)]`` deepest first (``index_match``)."""
        if not hashes:
            return []
        get = self.holders.get
        first = get(hashes[0], 0) & self.usable
        if not first:
            return []
        if first & self.unlinked:
            return walk(get, hashes, self.usable)
        return resolve(get, hashes, first)

    def match_linear(self, hashes: Sequence[int]) -> list[tuple[int, int]]:
        return walk(self.holders.get, hashes, self.usable)

    def touch(self, hashes: Sequence[int], depth: int) -> None:
        """Make the first ``depth`` hashes the most recent, the root last."""
        if depth <= 0:
            return
        holders = self.holders
        pop = holders.pop
        for h in reversed(hashes[:depth]):
            m = pop(h, None)
            if m is not None:
                holders[h] = m  # re-inserted: now the most recent

    # --- store ------------------------------------------------------------------------------------
    def store(self, slot: int, packed: bytes, parent: int | None) -> int:
        """A worker stored the chain ``packed`` under ``parent`` (None: from the root).

        Refused (0 stored): a chain that repeats a hash, the parent included (``bad_chains``:
        chained hashes never repeat, so the worker is broken or hostile), and a chain under a
        parent this worker does not hold (``orphan_blocks``). The parent is made the most recent
        before room is made, so the cap never evicts the block a chain continues from."""
        hashes = unpack_hashes(packed)
        distinct = set(hashes)
        if len(distinct) != len(hashes) or parent in distinct:
            self.counters["bad_chains"] += 1
            return 0
        holders, bit = self.holders, 1 << slot
        if parent is not None:
            if not holders.get(parent, 0) & bit:
                self.counters["orphan_blocks"] += len(hashes)
                return 0
            holders[parent] = holders.pop(parent)  # the most recent
        room = self.max_blocks - len(holders) - len(hashes)
        if room < 0:
            self.evict(-room + self.evict_chunk - 1, keep=parent)
        self._set(slot, bit, hashes)
        if parent is None:
            if len(hashes) > 1:
                self._link(hashes[:-1], hashes[1:])
        else:
            self._link([parent, *hashes[:-1]], hashes)
        return len(hashes)

    def store_unlinked(self, slot: int, packed: bytes) -> int:
        """Snapshot entries: no chain order, no links (see module doc)."""
        hashes = unpack_hashes(packed)
        room = self.max_blocks - len(self.holders) - len(hashes)
        if room < 0:
            self.evict(-room + self.evict_chunk - 1)
        if hashes:
            self.unlinked |= 1 << slot
            self._set(slot, 1 << slot, hashes)
        return len(hashes)

    def _set(self, slot: int, bit: int, hashes: list[int]) -> None:
        """Or ``bit`` into every hash (C-level bulk ops), counting references past the first."""
        holders = self.holders
        before = len(holders)
        # re-inserted below as the most recent, deepest first: leaves are evicted before their
        # ancestors; a hash listed twice pops 0 the second time (caught by ``distinct``)
        old = list(map(holders.pop, hashes, repeat(0)))
        base = len(holders)
        holders.update(zip(reversed(hashes), map(or_, reversed(old), repeat(bit))))
        distinct = len(holders) - base
        if distinct != len(hashes):
            self._set_repeats(slot, bit, hashes, old)
            return
        if before != base and reduce(or_, old) & bit:  # stored again: count the references
            extra, shifted = self.extra, slot << 64
            again = list(compress(hashes, map(and_, old, repeat(bit))))
            for h in again:
                extra[shifted | h] = extra.get(shifted | h, 0) + 1
            distinct -= len(again)
        self._held[slot] += distinct

    def _set_repeats(self, slot: int, bit: int, hashes: list[int], old: list[int]) -> None:
        """A hash listed twice (a snapshot of a hash held twice; chains never repeat, ``store``
        refuses them): redo the masks and count the references."""
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
        self._held[slot] += new

    def _link(self, parents: list[int], children: list[int]) -> None:
        """Link ``parent -> child`` for each pair whose child has no parent link yet (C-level
        bulk ops). A child that already has children of its own could be an ancestor of its new
        parent (a broken or hostile worker's chains): those pairs take the checked, one-by-one
        path, which refuses a link that would close a cycle (``refused_links``)."""
        up, kid = self.up, self.kid
        free = list(map(not_, map(up.__contains__, children)))
        if not all(free) or any(map(eq, parents, children)):
            free = list(map(and_, free, map(ne, parents, children)))
            parents, children = list(compress(parents, free)), list(compress(children, free))
            if not children:
                return
        if any(map(kid.__contains__, children)):
            for p, c in zip(parents, children):
                if c in kid and self._is_ancestor(c, p):
                    self.counters["refused_links"] += 1
                else:
                    self._link_one(p, c)
            return
        up.update(zip(children, parents))
        got = list(map(kid.setdefault, parents, children))
        if got != children:
            kids = self.kids
            for p, c in compress(zip(parents, children), map(ne, got, children)):
                kids.setdefault(p, set()).add(c)

    def _link_one(self, p: int, c: int) -> None:
        self.up[c] = p
        if self.kid.setdefault(p, c) != c:
            self.kids.setdefault(p, set()).add(c)

    def _is_ancestor(self, c: int, x: int | None) -> bool:
        """Whether ``c`` is ``x`` or one of its linked ancestors (past MAX_ANCESTRY steps: yes)."""
        up = self.up
        for _ in range(MAX_ANCESTRY):
            if x is None:
                return False
            if x == c:
                return True
            x = up.get(x)
        return True

    def _forget(self, h: int) -> None:
        """``h`` left the map: drop its link up and its links down."""
        p = self.up.pop(h, None)
        if p is not None:
            more = self.kids.get(p)
            if self.kid[p] == h:
                if more:
                    self.kid[p] = more.pop()
                else:
                    del self.kid[p]
            elif more is not None:
                more.discard(h)
            if more is not None and not more:
                del self.kids[p]
        c = self.kid.pop(h, None)
        if c is not None:
            del self.up[c]
            for x in self.kids.pop(h, ()):
                del self.up[x]

    def children(self, h: int) -> list[int]:
        c = self.kid.get(h)
        if c is None:
            return []
        more = self.kids.get(h)
        return [c, *more] if more else [c]

    # --- remove ------------------------------------------------------------------------------------
    def remove(self, slot: int, packed: bytes) -> int:
        """A worker dropped ``packed`` (one reference each); clears its linked descendants too."""
        hashes = unpack_hashes(packed)
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
            self._forget(h)
        self._held[slot] -= 1

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
    def evict(self, n: int, keep: int | None = None) -> None:
        """Drop the ``n`` least recently used *leaves* (hashes with no indexed child).

        An inner hash met among the oldest is moved to the recent end instead (its children
        are newer: evicting it would orphan them), so eviction never leaves a hole; so is
        ``keep`` (the block a chain being stored continues from). Each scan looks at every hash
        at most once, so the map can stay above its cap while nothing else is evictable.
        """
        holders = self.holders
        gone = scanned = 0
        budget = len(holders)
        while gone < n and holders and scanned < budget:
            batch = list(islice(holders, min(n - gone + 16, budget - scanned)))
            scanned += len(batch)
            for h in batch:
                m = holders.pop(h)
                if h in self.kid or h == keep:  # inner (or kept): moved to the recent end
                    holders[h] = m
                    continue
                self._forget(h)
                self._unhold(h, m)
                gone += 1
                if gone >= n:
                    break
        self.counters["evictions"] += gone

    def _unhold(self, h: int, m: int) -> None:
        held, extra = self._held, self.extra
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
            self._forget(h)
        if self.extra:
            for k in [k for k in self.extra if k >> 64 == slot]:
                del self.extra[k]
        self._held[slot] = 0
        self.unlinked &= keep

    def nbytes(self) -> int:
        """Memory of the maps: dict tables plus the hash ints they own (an estimate, O(1))."""
        size = sum(getsizeof(d) for d in (self.holders, self.kid, self.kids, self.extra, self.up))
        return size + (len(self.holders) + len(self.kid)) * 36

    def check(self) -> None:
        """Invariants (tests): counts right, links join indexed hashes both ways. (Prefix closure
        holds for workers whose chains are consistent; the tests check it as match == linear walk.)"""
        for s, n in enumerate(self._held):
            assert n == sum(1 for m in self.holders.values() if m >> s & 1), f"slot {s} count"
        for p, c in self.kid.items():
            for child in (c, *self.kids.get(p, ())):
                assert self.up[child] == p, f"link {p}->{child}"
                assert p in self.holders and child in self.holders, f"link {p}->{child} to a gone hash"
        assert len(self.up) == len(self.kid) + sum(map(len, self.kids.values())), "links"

    def slot_hashes(self, slot: int) -> list[int]:
        """Every hash a slot holds, a hash held twice listed twice."""
        bit = 1 << slot
        out = [h for h, m in self.holders.items() if m & bit]
        for key, refs in self.extra.items():
            if key >> 64 == slot:
                out.extend([key & ((1 << 64) - 1)] * refs)
        return out
