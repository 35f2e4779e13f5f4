"""Putting one request's token chunks back in ``seq`` order. Pure, synchronous.

Chunks of a request come from two workers (seq 0 from the prefill worker, the rest from the
decode worker) over core NATS, so they can arrive out of order or, after a redelivery, twice.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from kvrelay.schemas.messages import TokenChunk

PushResult = Literal["ok", "duplicate", "late", "overflow"]


class ReorderBuffer:
    """Releases chunks in ``seq`` order, starting at 0.

    Bounded: at most ``capacity`` chunks are held (released-but-not-popped plus waiting for a
    gap), and a chunk more than ``capacity`` ahead of the next expected seq is not held either:
    ``push`` answers ``"overflow"`` and the caller fails the request (the stream cannot be
    rebuilt). A seq already released or already waiting is a duplicate: dropped and counted.
    Chunks after the final one (``finish_reason`` set) are ``"late"``: dropped and counted.
    """

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.next_seq = 0  # the seq the next released chunk must have
        self.finished = False  # the final chunk has been released
        self.dropped = 0
        self._ready: deque[TokenChunk] = deque()
        self._waiting: dict[int, TokenChunk] = {}

    def push(self, chunk: TokenChunk) -> PushResult:
        if self.finished:
            self.dropped += 1
            return "late"
        seq = chunk.seq
        if seq < self.next_seq or seq in self._waiting:
            self.dropped += 1
            return "duplicate"
        if seq - self.next_seq >= self.capacity or self.held >= self.capacity:
            return "overflow"
        if seq != self.next_seq:
            self._waiting[seq] = chunk
            return "ok"
        self._release(chunk)
        while not self.finished and self.next_seq in self._waiting:
            self._release(self._waiting.pop(self.next_seq))
        return "ok"

    def _release(self, chunk: TokenChunk) -> None:
        self._ready.append(chunk)
        self.next_seq = chunk.seq + 1
        if chunk.finish_reason is not None:
            self.finished = True
            self.dropped += len(self._waiting)
            self._waiting.clear()

    def pop(self) -> TokenChunk | None:
        """The next in-order chunk, or None when none is ready."""
        return self._ready.popleft() if self._ready else None

    @property
    def held(self) -> int:
        return len(self._ready) + len(self._waiting)
