"""The prefix index: block hash -> which workers hold it, fed by KV events. Pure, synchronous.

Block hashes chain (``schemas.hashing``), so the hash of block i names the whole prefix up to
it, and a flat map ``hash -> holders`` answers "how many leading blocks of this request does
each worker hold" by walking the request's hashes until no worker holds the next one.

Representation (chosen for speed of ``match``): every worker gets a small slot number and the
holders of a hash are a bitmask of slots, kept prefix-closed per worker, so ``match``
binary-searches the depth at which each group of workers drops out (``router.index_match.
resolve``: O(log blocks) lookups for a typical request) and gives exactly what the linear walk
(``match_masks_linear``) gives. Workers loaded from a snapshot (no chain links) are matched by
the linear walk until their entries are swept.

Storage: ``kvrelay.router._holders.HolderTable`` (C: an open-addressing table of packed nodes,
no Python object per block) when the extension is built, else ``router.index_store.HolderMap``
(pure Python, the reference the tests compare it with). Same semantics; ``impl`` says which.

Bounds and policies:
- At most ``max_blocks`` distinct hashes. Storing past it evicts the least recently used
  leaves (hashes no indexed hash descends from), ``max_blocks // 64`` at a time (amortised
  O(1)); recency = last stored, or last walked by ``match`` (match
  records its walk; the recency is applied at the next ``apply`` or ``flush_touches``, off the
  decision path). Evictions are counted; an evicted hash is simply unknown to the router (a
  routing hint lost, nothing else).
- At most ``max_workers`` workers (slots); ``add_worker`` past it raises ``IndexFull``.
- Batches held while a worker is stale: at most ``max_pending`` per worker; past it the oldest
  are dropped and counted, and the worker needs another snapshot.
- Recent match walks kept for recency: at most ``max_touches`` (oldest dropped).

Event ids: a worker's batches are numbered 1, 2, ... within an epoch. A batch with the next id
is applied; an old id is a duplicate (ignored, counted); a higher id is a gap: the worker is
marked stale, its entries are ignored by ``match`` until ``apply_snapshot`` restores it, and
the caller is told to request a snapshot. A new epoch means the worker's cache restarted empty.
``remove_worker``, ``cleared`` and snapshots sweep the whole map: O(indexed blocks).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kvrelay.router.index_store import HolderMap
from kvrelay.schemas.hashing import HashSpecMismatch
from kvrelay.schemas.kv_events import KvEventBatch, pack_hashes

try:
    from kvrelay.router._holders import HolderTable
except ImportError:  # not built (no C compiler at install): the pure-Python reference serves
    HolderTable = None

NATIVE = HolderTable is not None

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
    pending: deque = field(default_factory=deque)  # batches received while stale


class PrefixIndex:
    """hash -> holders, with per-worker event ids, gap resync and an LRU cap. See module doc."""

    def __init__(self, spec: str, max_blocks: int = 1 << 20, max_workers: int = 1024,
                 max_pending: int = 256, max_touches: int = 1024) -> None:
        if max_blocks < 1 or max_workers < 1 or max_pending < 1 or max_touches < 1:
            raise ValueError("index bounds must be positive")
        if max_workers > 65536 or max_blocks > 1 << 31:
            raise ValueError("at most 65536 workers and 2**31 blocks")
        self.spec = spec
        self.max_blocks = max_blocks
        self.max_workers = max_workers
        self.max_pending = max_pending
        self._counts = dict.fromkeys(
            ("applied_batches", "applied_blocks", "duplicates", "gaps", "resyncs", "rejected",
             "spec_mismatches", "pending_dropped", "epochs"), 0)
        self.impl = "native" if NATIVE else "python"
        self._map: Any = (HolderTable(max_blocks, int.from_bytes(os.urandom(8), "little"))
                          if self.impl == "native" else HolderMap(max_blocks))
        self._workers: dict[str, _Worker] = {}
        self._by_slot: list[_Worker | None] = []
        self._ids: list[str] = []  # slot -> worker id ("" when free), for match
        self._bits: list[int] = []  # slot -> 1 << slot, one shared object per slot
        self._free: list[int] = []
        self._usable = 0  # bitmask of registered, non-stale slots
        self.version = 0  # bumped whenever a worker gets or loses a slot
        self._touches: deque[tuple[Sequence[int], int]] = deque(maxlen=max_touches)

    # --- workers -----------------------------------------------------------------------------
    def add_worker(self, worker_id: str, spec: str) -> bool:
        """Register a worker after checking its hash spec fingerprint. True when newly added.

        Raises HashSpecMismatch (counted) when its blocks hash differently from ours, and
        IndexFull when every slot is taken.
        """
        if spec != self.spec:
            self._counts["spec_mismatches"] += 1
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
        self._map.add_slot(slot)
        self._set_usable(self._usable | 1 << slot)
        self.version += 1
        return True

    def remove_worker(self, worker_id: str) -> bool:
        """Forget a worker and every entry it held. O(indexed blocks)."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return False
        self._map.sweep(w.slot)
        self._set_usable(self._usable & ~(1 << w.slot))
        self._by_slot[w.slot] = None
        self._ids[w.slot] = ""
        self._free.append(w.slot)
        self.version += 1
        return True

    def _set_usable(self, mask: int) -> None:
        self._usable = mask
        self._map.set_usable(mask)

    @property
    def counters(self) -> dict[str, int]:
        """Every counter: the index's and its storage's (a fresh dict)."""
        return {**self._counts, **self._map.counts()}

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

        The fast form of ``match``: a binary search per group of workers that drop out at the
        same depth (see module doc), not a lookup per block. ``bit(worker)`` maps back.
        """
        out = self._map.match(hashes)
        if out:
            self._touches.append((hashes, out[0][1]))
        return out

    def match_masks_linear(self, hashes: Sequence[int]) -> list[tuple[int, int]]:
        """``match_masks`` by the linear walk (the reference; no recency recorded)."""
        return self._map.match_linear(hashes)

    def bit(self, worker_id: str) -> int:
        """The bitmask of a worker's slot in ``match_masks`` results (0 when unknown)."""
        w = self._workers.get(worker_id)
        return 0 if w is None else self._bits[w.slot]

    @property
    def slot_ids(self) -> list[str]:
        """Slot -> worker id ("" when free): bit ``i`` of a ``match_masks`` mask is slot ``i``.
        The index's own list (kept current): read it, never change it."""
        return self._ids

    def flush_touches(self) -> None:
        """Apply the recency of recent matches to the LRU order (done by ``apply`` too)."""
        touch, touches = self._map.touch, self._touches
        while touches:
            touch(*touches.popleft())

    # --- events -------------------------------------------------------------------------------------
    def apply(self, batch: KvEventBatch) -> ApplyResult:
        """Apply one decoded batch, honouring event ids. An unknown worker is added first."""
        w = self._workers.get(batch.worker_id)
        if w is None:
            try:
                self.add_worker(batch.worker_id, batch.spec)
            except (HashSpecMismatch, IndexFull) as exc:
                self._counts["rejected"] += 1
                return ApplyResult("rejected", reason=str(exc))
            w = self._workers[batch.worker_id]
        elif batch.spec != self.spec:
            self._counts["rejected"] += 1
            self._counts["spec_mismatches"] += 1
            return ApplyResult("rejected", reason=str(HashSpecMismatch(w.worker_id, self.spec, batch.spec)))
        if batch.epoch != w.epoch:
            self._counts["epochs"] += 1
            self._reset(w, batch.epoch)
            if batch.event_id != 1:  # joined this epoch late: we need its state
                return self._gap(w, batch)
        if w.stale:
            self._hold(w, batch)
            return ApplyResult("stale", resync=False)
        if batch.event_id <= w.last_event:
            self._counts["duplicates"] += 1
            return ApplyResult("duplicate")
        if batch.event_id != w.last_event + 1:
            return self._gap(w, batch)
        return ApplyResult("applied", blocks=self._apply_events(w, batch))

    def _apply_events(self, w: _Worker, batch: KvEventBatch) -> int:
        if self._touches:
            self.flush_touches()
        n = 0
        store, remove, slot = self._map.store, self._map.remove, w.slot
        for ev in batch.events:
            kind = ev.kind
            if kind == "stored":
                n += store(slot, ev.hashes, ev.parent)
            elif kind == "removed":
                n += remove(slot, ev.hashes)
            else:
                self._map.sweep(slot)
        w.last_event = batch.event_id
        self._counts["applied_batches"] += 1
        self._counts["applied_blocks"] += n
        return n

    def _reset(self, w: _Worker, epoch: int) -> None:
        if self._map.held(w.slot) or self._map.unlinked & (1 << w.slot):
            self._map.sweep(w.slot)
        w.epoch, w.last_event, w.stale = epoch, 0, False
        w.pending.clear()
        self._set_usable(self._usable | 1 << w.slot)

    def _gap(self, w: _Worker, batch: KvEventBatch) -> ApplyResult:
        self._counts["gaps"] += 1
        w.stale = True
        self._set_usable(self._usable & ~(1 << w.slot))
        self._hold(w, batch)
        self._counts["resyncs"] += 1
        reason = f"expected event {w.last_event + 1}, got {batch.event_id}"
        return ApplyResult("gap", resync=True, reason=reason)

    def _hold(self, w: _Worker, batch: KvEventBatch) -> None:
        if len(w.pending) >= self.max_pending:
            w.pending.popleft()
            self._counts["pending_dropped"] += 1
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
                self._counts["rejected"] += 1
                return ApplyResult("rejected", reason=str(exc))
            w = self._workers[worker_id]
        elif spec != self.spec:
            self._counts["spec_mismatches"] += 1
            self._counts["rejected"] += 1
            return ApplyResult("rejected", reason=str(HashSpecMismatch(worker_id, self.spec, spec)))
        held = [b for b in w.pending if b.epoch == epoch and b.event_id > event_id]
        self._reset(w, epoch)
        n = self._map.store_unlinked(w.slot, pack_hashes(hashes))
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
        return self._map.slot_hashes(self._workers[worker_id].slot)

    # --- introspection -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._map)

    def nbytes(self) -> int:
        """Memory held by the storage (exact for the C table, an estimate for Python's)."""
        return self._map.nbytes()

    def check(self) -> None:
        """Check the storage's invariants (tests; O(indexed blocks)); AssertionError if broken."""
        self._map.check()

    def stats(self) -> dict[str, object]:
        held = self._map.held
        return {
            "impl": self.impl,
            "workers": len(self._workers),
            "stale_workers": sorted(w.worker_id for w in self._workers.values() if w.stale),
            "blocks": len(self._map),
            "entries": sum(held(w.slot) for w in self._workers.values()),
            "max_blocks": self.max_blocks,
            "held": {w.worker_id: held(w.slot) for w in self._workers.values()},
            **self.counters,
        }
