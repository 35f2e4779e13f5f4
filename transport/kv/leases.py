"""Block allocator and lease table for an export region: pure, synchronous, no I/O.

The owner of a region (the prefill engine) allocates blocks for each export under a *ticket*
and a lease expiry; a decode worker's release, or the expiry, frees them. Freeing calls
``on_free(blocks)``, which the owner wires to ``ExportRegion.clear_tickets`` so a late reader
sees its ticket gone (``LeaseExpired``) instead of another request's KV.

Bounded by construction: at most ``num_blocks`` blocks are held, and each held block belongs to
exactly one lease. When there is no room, ``allocate`` raises ``RegionFull`` (push back: the
prefill worker rejects the task and the router tries another worker). The expiry heap is
compacted when stale entries outnumber live leases.

Allocation prefers one contiguous run (reads are then one large copy) and otherwise takes the
lowest free blocks.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from kvrelay.transport.errors import RegionFull

NEVER = 1 << 62  # an expiry that does not come


@dataclass
class Lease:
    ticket: int
    blocks: list[int]
    expires_ms: int


class LeaseTable:
    """Which region blocks each ticket holds, and until when. Not thread-safe: one owner."""

    def __init__(self, num_blocks: int, on_free: Callable[[list[int]], None] | None = None) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self._on_free = on_free
        self._free = bytearray(b"\x01") * num_blocks  # 1 = free
        self._num_free = num_blocks
        self._leases: dict[int, Lease] = {}
        self._heap: list[tuple[int, int]] = []  # (expires_ms, ticket); stale entries skipped lazily
        self.allocated_total = 0
        self.released_total = 0
        self.expired_total = 0
        self.rejected_total = 0

    # -- queries -------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return self._num_free

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self._num_free

    @property
    def active(self) -> int:
        return len(self._leases)

    def blocks_of(self, ticket: int) -> list[int] | None:
        lease = self._leases.get(ticket)
        return None if lease is None else list(lease.blocks)

    def expires_at(self, ticket: int) -> int | None:
        lease = self._leases.get(ticket)
        return None if lease is None else lease.expires_ms

    # -- changes -------------------------------------------------------------------------
    def allocate(self, num_blocks: int, ticket: int, expires_ms: int) -> list[int]:
        """Hold ``num_blocks`` blocks under ``ticket`` until ``expires_ms``; ``RegionFull`` if no room."""
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if ticket < 1:
            raise ValueError("tickets are >= 1 (0 marks a free block)")
        if ticket in self._leases:
            raise ValueError(f"ticket {ticket} already holds blocks")
        if num_blocks > self._num_free:
            self.rejected_total += 1
            raise RegionFull(
                f"export region full: {num_blocks} blocks wanted, {self._num_free} of {self.num_blocks} free"
            )
        blocks = self._take(num_blocks)
        self._leases[ticket] = Lease(ticket, blocks, expires_ms)
        self._push(expires_ms, ticket)
        self.allocated_total += 1
        return list(blocks)

    def renew(self, ticket: int, expires_ms: int) -> bool:
        """Move a lease's expiry (later or earlier); False if the ticket holds nothing."""
        lease = self._leases.get(ticket)
        if lease is None:
            return False
        lease.expires_ms = expires_ms
        self._push(expires_ms, ticket)
        return True

    def release(self, ticket: int) -> bool:
        """Free the ticket's blocks now; False if it holds none (released or expired: idempotent)."""
        lease = self._leases.pop(ticket, None)
        if lease is None:
            return False
        self._give_back(lease.blocks)
        self.released_total += 1
        return True

    def expire(self, now_ms: int) -> list[int]:
        """Free every lease whose expiry is <= ``now_ms``; returns their tickets."""
        freed: list[int] = []
        while self._heap and self._heap[0][0] <= now_ms:
            expires_ms, ticket = heapq.heappop(self._heap)
            lease = self._leases.get(ticket)
            if lease is None or lease.expires_ms != expires_ms:
                continue  # released or renewed since
            del self._leases[ticket]
            self._give_back(lease.blocks)
            freed.append(ticket)
        self.expired_total += len(freed)
        return freed

    # -- internals -----------------------------------------------------------------------
    def _take(self, n: int) -> list[int]:
        start = self._free.find(b"\x01" * n)
        if start >= 0:
            blocks = list(range(start, start + n))
        else:
            blocks, pos = [], 0
            while len(blocks) < n:
                pos = self._free.index(1, pos)
                blocks.append(pos)
                pos += 1
        for b in blocks:
            self._free[b] = 0
        self._num_free -= n
        return blocks

    def _give_back(self, blocks: list[int]) -> None:
        for b in blocks:
            self._free[b] = 1
        self._num_free += len(blocks)
        if self._on_free is not None:
            self._on_free(blocks)

    def _push(self, expires_ms: int, ticket: int) -> None:
        heapq.heappush(self._heap, (expires_ms, ticket))
        if len(self._heap) > 2 * len(self._leases) + 64:
            self._heap = [(lease.expires_ms, t) for t, lease in self._leases.items()]
            heapq.heapify(self._heap)
