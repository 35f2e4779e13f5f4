"""Decode slots: how many requests a decode worker runs, counted *before* it pulls work.

A pull loop reserves slots (``acquire``), asks JetStream for at most that many messages, keeps
one slot per message it starts and gives the rest back. So running requests plus outstanding
pull requests never exceed ``capacity``. Waiters are served first come, first served: a loop
that gives a slot back cannot take it again ahead of another loop already waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.used = 0  # running + reserved
        self._waiters: deque[asyncio.Future[int]] = deque()

    @property
    def free(self) -> int:
        return self.capacity - self.used

    async def acquire(self, most: int, timeout: float) -> int:
        """Take between 1 and ``most`` free slots; 0 if none came free within ``timeout``."""
        if most < 1:
            raise ValueError("most must be >= 1")
        if self.free > 0 and not self._waiters:
            n = min(self.free, most)
            self.used += n
            return n
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait({fut}, timeout=timeout)
        except asyncio.CancelledError:
            if fut.done():
                self.release(fut.result())  # handed over just as we were cancelled: give it back
            else:
                self._forget(fut)
            raise
        if not fut.done():
            self._forget(fut)
            return 0
        n = fut.result()  # one slot was handed over; take more if free and nobody else waits
        extra = min(self.free, most - n) if not self._waiters else 0
        self.used += extra
        return n + extra

    def release(self, n: int = 1) -> None:
        """Give ``n`` slots back; each goes to the longest waiter if there is one."""
        if n < 0 or n > self.used:
            raise ValueError(f"cannot release {n} of {self.used} used slots")
        self.used -= n
        while self._waiters and self.free > 0:
            fut = self._waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(1)

    def _forget(self, fut: asyncio.Future[int]) -> None:
        fut.cancel()
        if fut in self._waiters:
            self._waiters.remove(fut)
