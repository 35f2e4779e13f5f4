"""The simulated engine's KV block manager: prefix caching, refcounts, LRU eviction, KV events.

Pure and synchronous (no I/O, no clock), so the routing simulator and the async engines share it.

Model (as vLLM's block pool): ``num_blocks`` blocks of ``block_size`` tokens. A request's prompt
takes ``ceil(num_tokens / block_size)`` blocks. Full blocks are named by their chained hash
(``schemas.hashing``) and cached by it: a later request whose leading hashes are cached reuses
those blocks (a *hit*) instead of computing them. A block in use by a running request is
referenced (refcount > 0) and never evicted; when its last user frees it, a hashed block stays
cached and joins the LRU list of evictable blocks, an unhashed (partial) block goes back to the
free list. Allocation takes free blocks first, then evicts the least recently used cached ones.

Eviction order: a request frees its blocks last block first, so a prefix's deeper blocks are
always older in the LRU list than its shallower ones and are evicted first. A cached block's
parent is therefore always cached too, which keeps "leading blocks held" meaningful.

Events (``schemas.kv_events``): ``stored`` when hashed blocks become resident (at allocation,
in prefix order, with their parent hash), ``removed`` when cached blocks are evicted, ``cleared``
by ``clear``. Each hash is stored once while resident and removed once, so replaying the events
gives exactly ``held()``. Events go to ``sink`` when one is given (e.g. the worker's
``KvEventPublisher``), otherwise into a bounded pending list that ``take_batch`` numbers as
``KvEventBatch`` 1, 2, 3, ... of this manager's ``epoch``.

Bounds: blocks are bounded by ``num_blocks`` and requests by blocks (each holds at least one).
Pending events are bounded by ``max_pending_events``; past it they are dropped, counted, and the
next batch id is skipped on purpose, so a router sees the gap and asks for a snapshot.
A request that cannot get its blocks (after evicting every evictable block) raises
``BlocksFull`` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvrelay.schemas.kv_events import KvEvent, KvEventBatch


class BlockManagerError(Exception):
    """Base of block manager errors."""


class BlocksFull(BlockManagerError):
    """Not enough free or evictable blocks for a request (push back; nothing was changed)."""

    def __init__(self, request_id: str, needed: int, available: int) -> None:
        super().__init__(f"request {request_id!r} needs {needed} new blocks, {available} can be had")
        self.request_id, self.needed, self.available = request_id, needed, available


class BadAllocation(BlockManagerError, ValueError):
    """Invalid arguments: empty request, too many hashes, request already holding blocks."""


class BlockManager:
    """Blocks, prefix cache and LRU; see the module doc. Not thread-safe: one owner."""

    def __init__(self, num_blocks: int, block_size: int, *, worker_id: str = "sim", spec: str = "",
                 epoch: int = 0, sink: Callable[[KvEvent], None] | None = None,
                 max_pending_events: int = 65536) -> None:
        if num_blocks < 1 or block_size < 1 or max_pending_events < 1:
            raise ValueError("num_blocks, block_size and max_pending_events must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.worker_id, self.spec, self.epoch = worker_id, spec, epoch
        self.sink = sink
        self.max_pending_events = max_pending_events
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # stack: lowest id on top
        self._refs = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # hash -> block
        self._lru: dict[int, None] = {}  # evictable cached blocks, least recently used first
        self._requests: dict[str, list[int]] = {}  # request -> its blocks, in prompt order
        self._pending: list[KvEvent] = []
        self._next_id = 1
        self.counters = dict.fromkeys(("allocations", "hit_blocks", "stored_blocks", "evicted_blocks",
                                       "full", "dropped_events", "duplicate_hashes"), 0)

    # --- queries -----------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Blocks a new request can get: never-used plus evictable cached ones."""
        return len(self._free) + len(self._lru)

    @property
    def used_blocks(self) -> int:
        """Blocks referenced by running requests."""
        return self.num_blocks - self.free_blocks

    @property
    def running(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def num_cached(self) -> int:
        """Distinct hashes cached (referenced or evictable)."""
        return len(self._cached)

    def held(self) -> list[int]:
        """Every cached hash (referenced or evictable): the state the events describe."""
        return list(self._cached)

    def cached_blocks(self, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` cached now (a read-only peek: recency is not touched)."""
        cached, n = self._cached, 0
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    # --- allocate / free -------------------------------------------------------------------------
    def allocate(self, request_id: str, hashes: Sequence[int], num_tokens: int) -> int:
        """Give ``request_id`` blocks for ``num_tokens`` tokens; returns the cached prompt tokens.

        ``hashes`` are the chained hashes of the prompt's leading full blocks (at most
        ``num_tokens // block_size``; blocks past them are private to the request). As in vLLM,
        the last prompt token is always computed (it yields the first output token), so the
        cached tokens are at most ``num_tokens - 1``. Raises ``BlocksFull`` or ``BadAllocation``.
        """
        bs = self.block_size
        if num_tokens < 1:
            raise BadAllocation(f"request {request_id!r}: num_tokens must be >= 1, got {num_tokens}")
        if len(hashes) > num_tokens // bs:
            raise BadAllocation(f"request {request_id!r}: {len(hashes)} hashes for {num_tokens} tokens")
        if request_id in self._requests:
            raise BadAllocation(f"request {request_id!r} already holds blocks")
        need = -(-num_tokens // bs)
        hits = self.cached_blocks(hashes)
        hit_blocks = [self._cached[h] for h in hashes[:hits]]
        evictable_hits = sum(1 for b in hit_blocks if self._refs[b] == 0)
        available = len(self._free) + len(self._lru) - evictable_hits
        if need - hits > available:
            self.counters["full"] += 1
            raise BlocksFull(request_id, need - hits, available)
        for b in hit_blocks:  # referenced now: no longer evictable
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1
        blocks = hit_blocks + self._take(need - hits)
        self._name(blocks, hashes, hits)
        self._requests[request_id] = blocks
        self.counters["allocations"] += 1
        self.counters["hit_blocks"] += hits
        return min(hits * bs, num_tokens - 1)

    def free(self, request_id: str) -> bool:
        """Drop the request's references, last block first; False if it holds none (idempotent)."""
        blocks = self._requests.pop(request_id, None)
        if blocks is None:
            return False
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            if self._hash_of[b] is None:
                self._free.append(b)
            else:
                self._lru[b] = None  # the most recent; the deepest block was appended first
        return True

    def clear(self) -> None:
        """Drop every cached block (``cleared`` event). Only with no request running."""
        if self._requests:
            raise BadAllocation(f"cannot clear the cache with {len(self._requests)} requests running")
        for b in self._lru:
            self._hash_of[b] = None
            self._free.append(b)
        self._lru.clear()
        self._cached.clear()
        self._emit(KvEvent.cleared())

    def _take(self, n: int) -> list[int]:
        """``n`` unreferenced blocks, free ones first, then LRU victims (``removed`` event)."""
        out = [self._free.pop() for _ in range(min(n, len(self._free)))]
        victims: list[int] = []
        lru = self._lru
        while len(out) < n:
            b = next(iter(lru))
            del lru[b]
            h = self._hash_of[b]
            self._hash_of[b] = None
            del self._cached[h]  # type: ignore[arg-type]
            victims.append(h)  # type: ignore[arg-type]
            out.append(b)
        if victims:
            self.counters["evicted_blocks"] += len(victims)
            self._emit(KvEvent.removed(victims))
        for b in out:
            self._refs[b] = 1
        return out

    def _name(self, blocks: list[int], hashes: Sequence[int], hits: int) -> None:
        """Cache the new full blocks under their hashes (``stored`` event, in prefix order)."""
        stored: list[int] = []
        for i in range(hits, len(hashes)):
            h = hashes[i]
            if h in self._cached:  # cannot happen with chained hashes; keep the block private
                self.counters["duplicate_hashes"] += 1
                continue
            self._cached[h] = blocks[i]
            self._hash_of[blocks[i]] = h
            stored.append(h)
        if stored:
            self.counters["stored_blocks"] += len(stored)
            parent = hashes[hits - 1] if hits else None
            self._emit(KvEvent.stored(stored, parent=parent, num_tokens=len(stored) * self.block_size))

    # --- events ----------------------------------------------------------------------------------
    def _emit(self, event: KvEvent) -> None:
        if self.sink is not None:
            self.sink(event)
            return
        if len(self._pending) >= self.max_pending_events:
            self.counters["dropped_events"] += 1
            self._pending.clear()
            self._next_id += 1  # the skipped id is the gap routers resync on
            return
        self._pending.append(event)

    def take_batch(self, max_events: int = 1024) -> KvEventBatch | None:
        """The pending events (up to ``max_events``) as the next numbered batch; None if none."""
        if not self._pending:
            return None
        events, self._pending = self._pending[:max_events], self._pending[max_events:]
        batch = KvEventBatch(worker_id=self.worker_id, epoch=self.epoch, event_id=self._next_id,
                             spec=self.spec, events=events)
        self._next_id += 1
        return batch

    @property
    def last_event_id(self) -> int:
        """The id of the last batch numbered (taken or skipped)."""
        return self._next_id - 1
