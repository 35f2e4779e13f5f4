"""The prefix index: block hash -> which workers hold it, fed by KV events. Pure, synchronous.

Block hashes chain (``schemas.hashing``), so the hash of block i names the whole prefix up to
it, and a flat map ``hash -> holders`` answers "how many leading blocks of this request does
each worker hold" by walking the request's hashes until no worker holds the next one.

Representation (chosen for speed of ``match``): every worker gets a small slot number and the
holders of a hash are an int bitmask of slots, so one dict lookup and one ``&`` per block walk
all workers at once. The same hash can be stored twice by one worker (and removed twice):
references beyond the first are counted in a side map that is empty in the common case.

Bounds and policies:
- At most ``max_blocks`` distinct hashes. Storing past it evicts the least recently used
  hashes, ``max_blocks // 64`` at a time (amortised O(1)); recency = last stored, or last walked
  by ``match`` (match records its walk; the recency is applied at the next ``apply`` or
  ``flush_touches``, off the decision path). Evictions are counted; an evicted hash is simply
  unknown to the router (a routing hint lost, nothing else).
- At most ``max_workers`` workers (slots); ``add_worker`` past it raises ``IndexFull``.
- Batches held while a worker is stale: at most ``max_pending`` per worker; past it the oldest
  are dropped and counted, and the worker needs another snapshot.

Event ids: a worker's batches are numbered 1, 2, ... within an epoch. A batch with the next id
is applied; an old id is a duplicate (ignored, counted); a higher id is a gap: the worker is
marked stale, its entries are ignored by ``match`` until ``apply_snapshot`` restores it, and
the caller is told to request a snapshot. A new epoch means the worker's cache restarted empty.
``remove_worker``, ``cleared`` and snapshots sweep the whole map: O(indexed blocks).
"""

from __future__ import annotations

from collections import Counter, deque
from itertools import islice
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvrelay.schemas.hashing import HashSpecMismatch
from kvrelay.schemas.kv_events import KvEventBatch

Status = Literal["applied", "duplicate", "gap", "stale", "rejected"]


class PrefixIndexError(Exception):
    """Base of prefix-index errors."""


class IndexFull(PrefixIndexError):
    """No free worker slot (``max_workers`` reached)."""


@dataclass(frozen=True)
class ApplyResult:
    status: Status
    blocks: int = 0  # block hashes applied
    resync: bool = False  # the caller should request a snapshot of this worker
    reason: str = ""


@dataclass
class _Worker:
    worker_id: str
    slot: int
    spec: str
    epoch: int = -1
    last_event: int = 0
    stale: bool = False
    held: int = 0  # distinct hashes held
    pending: deque = field(default_factory=deque)  # batches received while stale


class PrefixIndex:
    """hash -> holders, with per-worker event ids, gap resync and an LRU cap. See module doc."""

    def __init__(self, spec: str, max_blocks: int = 1 << 20, max_workers: int = 1024,
                 max_pending: int = 256, max_touches: int = 1024) -> None:
        if max_blocks < 1 or max_workers < 1 or max_pending < 1 or max_touches < 1:
            raise ValueError("index bounds must be positive")
        self.spec = spec
        self.max_blocks = max_blocks
        self.max_workers = max_workers
        self.max_pending = max_pending
        self._evict_chunk = max(1, max_blocks // 64)
        self._holders: dict[int, int] = {}  # hash -> slot bitmask, in LRU order (oldest first)
        self._extra: dict[int, int] = {}  # (slot << 64 | hash) -> references beyond the first
        self._workers: dict[str, _Worker] = {}
        self._by_slot: list[_Worker | None] = []
        self._ids: list[str] = []  # slot -> worker id ("" when free), for match
        self._bits: list[int] = []  # slot -> 1 << slot, one shared object per slot
        self._free: list[int] = []
        self._usable = 0  # bitmask of registered, non-stale slots
        self.version = 0  # bumped whenever a worker gets or loses a slot
        self._touches: deque[tuple[Sequence[int], int]] = deque(maxlen=max_touches)
        self.counters = dict.fromkeys(
            ("applied_batches", "applied_blocks", "duplicates", "gaps", "resyncs", "rejected",
             "spec_mismatches", "evictions", "unknown_removes", "pending_dropped", "epochs"), 0)

    # --- workers -----------------------------------------------------------------------------
    def add_worker(self, worker_id: str, spec: str) -> bool:
        """Register a worker after checking its hash spec fingerprint. True when newly added.

        Raises HashSpecMismatch (counted) when its blocks hash differently from ours, and
        IndexFull when every slot is taken.
        """
        if spec != self.spec:
            self.counters["spec_mismatches"] += 1
            raise HashSpecMismatch(worker_id, self.spec, spec)
        if worker_id in self._workers:
            return False
        if self._free:
            slot = self._free.pop()
        elif len(self._by_slot) < self.max_workers:
            slot = len(self._by_slot)
            self._by_slot.append(None)
            self._ids.append("")
            self._bits.append(1 << slot)
        else:
            raise IndexFull(f"{self.max_workers} workers indexed already")
        w = _Worker(worker_id, slot, spec)
        self._workers[worker_id] = w
        self._by_slot[slot] = w
        self._ids[slot] = worker_id
        self._usable |= 1 << slot
        self.version += 1
        return True

    def remove_worker(self, worker_id: str) -> bool:
        """Forget a worker and every entry it held. O(indexed blocks)."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return False
        self._sweep(w)
        self._usable &= ~(1 << w.slot)
        self._by_slot[w.slot] = None
        self._ids[w.slot] = ""
        self._free.append(w.slot)
        self.version += 1
        return True

    def workers(self) -> list[str]:
        return list(self._workers)

    def is_stale(self, worker_id: str) -> bool:
        w = self._workers.get(worker_id)
        return w is not None and w.stale

    def last_event(self, worker_id: str) -> tuple[int, int] | None:
        """(epoch, last applied event id) of a worker, None when unknown."""
        w = self._workers.get(worker_id)
        return None if w is None else (w.epoch, w.last_event)

    # --- match ------------------------------------------------------------------------------------
    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """``{worker: leading blocks held}`` for every usable worker holding at least one."""
        ids, out = self._ids, {}
        for mask, depth in self.match_masks(hashes):
            while mask:
                low = mask & -mask
                out[ids[low.bit_length() - 1]] = depth
                mask ^= low
        return out

    def match_masks(self, hashes: Sequence[int]) -> list[tuple[int, int]]:
        """``[(slot bitmask, leading blocks)]``, deepest first, masks disjoint, depths >= 1.

        The fast form of ``match``: one dict lookup and one ``&`` per block, one entry per
        depth at which workers drop out (not per worker). ``bit(worker)`` maps back.
        """
        get = self._holders.get
        active = self._usable
        out: list[tuple[int, int]] = []
        depth = 0
        for h in hashes:
            held = get(h, 0) & active
            if held != active:
                if depth:
                    out.append((active & ~held, depth))
                active = held
                if not active:
                    break
            depth += 1
        if active and depth:
            out.append((active, depth))
        if out:
            self._touches.append((hashes, out[-1][1]))
            out.reverse()
        return out

    def bit(self, worker_id: str) -> int:
        """The bitmask of a worker's slot in ``match_masks`` results (0 when unknown)."""
        w = self._workers.get(worker_id)
        return 0 if w is None else self._bits[w.slot]

    def flush_touches(self) -> None:
        """Apply the recency of recent matches to the LRU order (done by ``apply`` too)."""
        holders = self._holders
        pop = holders.pop
        while self._touches:
            hashes, depth = self._touches.popleft()
            for h in hashes[:depth]:
                m = pop(h, None)
                if m is not None:
                    holders[h] = m  # re-inserted: now the most recent

    # --- events -------------------------------------------------------------------------------------
    def apply(self, batch: KvEventBatch) -> ApplyResult:
        """Apply one decoded batch, honouring event ids. An unknown worker is added first."""
        w = self._workers.get(batch.worker_id)
        if w is None:
            try:
                self.add_worker(batch.worker_id, batch.spec)
            except (HashSpecMismatch, IndexFull) as exc:
                self.counters["rejected"] += 1
                return ApplyResult("rejected", reason=str(exc))
            w = self._workers[batch.worker_id]
        elif batch.spec != self.spec:
            self.counters["rejected"] += 1
            self.counters["spec_mismatches"] += 1
            return ApplyResult("rejected", reason=str(HashSpecMismatch(w.worker_id, self.spec, batch.spec)))
        if batch.epoch != w.epoch:
            self.counters["epochs"] += 1
            self._reset(w, batch.epoch)
            if batch.event_id != 1:  # joined this epoch late: we need its state
                return self._gap(w, batch)
        if w.stale:
            self._hold(w, batch)
            return ApplyResult("stale", resync=False)
        if batch.event_id <= w.last_event:
            self.counters["duplicates"] += 1
            return ApplyResult("duplicate")
        if batch.event_id != w.last_event + 1:
            return self._gap(w, batch)
        return ApplyResult("applied", blocks=self._apply_events(w, batch))

    def _apply_events(self, w: _Worker, batch: KvEventBatch) -> int:
        if self._touches:
            self.flush_touches()
        n = 0
        for ev in batch.events:
            if ev.kind == "stored":
                n += self._store(w, ev.block_hashes)
            elif ev.kind == "removed":
                n += self._remove(w, ev.block_hashes)
            else:
                self._sweep(w)
        w.last_event = batch.event_id
        self.counters["applied_batches"] += 1
        self.counters["applied_blocks"] += n
        return n

    def _store(self, w: _Worker, hashes: list[int]) -> int:
        holders = self._holders
        room = self.max_blocks - len(holders) - len(hashes)
        if room < 0:
            self._evict(-room + self._evict_chunk - 1)
        bit = self._bits[w.slot]
        known = holders.keys() & hashes  # C-level; usually few (shared prefixes)
        fresh = dict.fromkeys(hashes, bit)
        new = 0
        if known:
            extra, shifted, pop = self._extra, w.slot << 64, holders.pop
            for h in known:
                del fresh[h]
                m = pop(h)  # re-inserted below: stored blocks become the most recent
                if m & bit:
                    key = shifted | h
                    extra[key] = extra.get(key, 0) + 1
                else:
                    m |= bit
                    new += 1
                holders[h] = m
        holders.update(fresh)  # the new hashes, in one C-level call
        w.held += new + len(fresh)
        if len(fresh) + len(known) != len(hashes):  # a hash listed twice: count the extra references
            self._count_repeats(w.slot, hashes)
        return len(hashes)

    def _remove(self, w: _Worker, hashes: Iterable[int]) -> int:
        holders, extra = self._holders, self._extra
        get = holders.get
        bit, shifted = 1 << w.slot, w.slot << 64
        n = gone = 0
        for h in hashes:
            n += 1
            m = get(h, 0)
            if not m & bit:
                self.counters["unknown_removes"] += 1  # evicted by our cap, or never seen
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
            m ^= bit
            if m:
                holders[h] = m
            else:
                del holders[h]
            gone += 1
        w.held -= gone
        return n

    def _count_repeats(self, slot: int, hashes: list[int]) -> None:
        extra, shifted = self._extra, slot << 64
        for h, refs in Counter(hashes).items():
            if refs > 1:
                extra[shifted | h] = extra.get(shifted | h, 0) + refs - 1

    def _evict(self, n: int) -> None:
        """Drop the ``n`` least recently used hashes (evicting in chunks keeps it amortised O(1))."""
        holders, extra, by_slot = self._holders, self._extra, self._by_slot
        victims = list(islice(holders, min(n, len(holders))))
        self.counters["evictions"] += len(victims)
        for h in victims:
            m = holders.pop(h)
            while m:
                low = m & -m
                slot = low.bit_length() - 1
                m ^= low
                w = by_slot[slot]
                if w is not None:
                    w.held -= 1
                if extra:
                    extra.pop(slot << 64 | h, None)

    def _sweep(self, w: _Worker) -> None:
        """Drop every entry of one worker: O(indexed blocks)."""
        bit, keep = 1 << w.slot, ~(1 << w.slot)
        holders = self._holders
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
        if self._extra:
            mine = [k for k in self._extra if k >> 64 == w.slot]
            for k in mine:
                del self._extra[k]
        w.held = 0

    def _reset(self, w: _Worker, epoch: int) -> None:
        if w.held:
            self._sweep(w)
        w.epoch, w.last_event, w.stale = epoch, 0, False
        w.pending.clear()
        self._usable |= 1 << w.slot

    def _gap(self, w: _Worker, batch: KvEventBatch) -> ApplyResult:
        self.counters["gaps"] += 1
        w.stale = True
        self._usable &= ~(1 << w.slot)
        self._hold(w, batch)
        self.counters["resyncs"] += 1
        reason = f"expected event {w.last_event + 1}, got {batch.event_id}"
        return ApplyResult("gap", resync=True, reason=reason)

    def _hold(self, w: _Worker, batch: KvEventBatch) -> None:
        if len(w.pending) >= self.max_pending:
            w.pending.popleft()
            self.counters["pending_dropped"] += 1
        w.pending.append(batch)

    # --- snapshots ------------------------------------------------------------------------------------
    def apply_snapshot(self, worker_id: str, spec: str, epoch: int, event_id: int,
                       hashes: Iterable[int]) -> ApplyResult:
        """Replace a worker's entries with a snapshot taken after ``event_id``, then replay the
        batches held since. ``resync=True`` in the result when held batches still leave a gap."""
        w = self._workers.get(worker_id)
        if w is None:
            try:
                self.add_worker(worker_id, spec)
            except (HashSpecMismatch, IndexFull) as exc:
                self.counters["rejected"] += 1
                return ApplyResult("rejected", reason=str(exc))
            w = self._workers[worker_id]
        elif spec != self.spec:
            self.counters["spec_mismatches"] += 1
            self.counters["rejected"] += 1
            return ApplyResult("rejected", reason=str(HashSpecMismatch(worker_id, self.spec, spec)))
        held = [b for b in w.pending if b.epoch == epoch and b.event_id > event_id]
        self._reset(w, epoch)
        n = self._store(w, list(hashes))
        w.last_event = event_id
        for b in sorted(held, key=lambda b: b.event_id):
            if b.event_id <= w.last_event:
                continue
            if b.event_id != w.last_event + 1:
                self._gap(w, b)
                return ApplyResult("gap", blocks=n, resync=True, reason="held batches leave a gap")
            n += self._apply_events(w, b)
        return ApplyResult("applied", blocks=n)

    def snapshot(self, worker_id: str) -> list[int]:
        """Every hash a worker holds, a hash held twice listed twice (tests, debugging)."""
        w = self._workers[worker_id]
        bit = 1 << w.slot
        out = [h for h, m in self._holders.items() if m & bit]
        for key, refs in self._extra.items():
            if key >> 64 == w.slot:
                out.extend([key & ((1 << 64) - 1)] * refs)
        return out

    # --- introspection -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._holders)

    def stats(self) -> dict[str, object]:
        return {
            "workers": len(self._workers),
            "stale_workers": sorted(w.worker_id for w in self._workers.values() if w.stale),
            "blocks": len(self._holders),
            "entries": sum(w.held for w in self._workers.values()),
            "max_blocks": self.max_blocks,
            "held": {w.worker_id: w.held for w in self._workers.values()},
            **self.counters,
        }
