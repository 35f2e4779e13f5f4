"""Decode slots: reservations never exceed capacity, waiters are served in order, nothing leaks."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.workers.slots import Slots


async def test_slots_acquire_takes_at_most_the_free_slots() -> None:
    s = Slots(3)
    assert await s.acquire(2, timeout=1) == 2
    assert await s.acquire(5, timeout=1) == 1
    assert s.free == 0
    assert await s.acquire(1, timeout=0.01) == 0
    s.release(2)
    assert s.free == 2


async def test_slots_release_goes_to_the_longest_waiter() -> None:
    s = Slots(1)
    assert await s.acquire(1, timeout=1) == 1
    first = asyncio.create_task(s.acquire(1, timeout=5))
    await asyncio.sleep(0)  # let it queue (ordering setup only, no timing)
    second = asyncio.create_task(s.acquire(1, timeout=5))
    await asyncio.sleep(0)
    s.release()
    assert await asyncio.wait_for(first, 1) == 1
    # the slot went to `first`: a newcomer cannot take it, and `second` still waits
    assert await s.acquire(1, timeout=0.01) == 0 and not second.done()
    s.release()
    assert await asyncio.wait_for(second, 1) == 1
    assert s.used == 1


async def test_slots_cancelled_waiter_leaks_nothing() -> None:
    s = Slots(1)
    await s.acquire(1, timeout=1)
    waiter = asyncio.create_task(s.acquire(1, timeout=5))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    s.release()
    assert s.free == 1 and await s.acquire(1, timeout=0.01) == 1


async def test_slots_waiter_takes_extra_free_slots_when_alone() -> None:
    s = Slots(3)
    assert await s.acquire(3, timeout=1) == 3
    waiter = asyncio.create_task(s.acquire(3, timeout=5))
    await asyncio.sleep(0)
    s.release(2)
    assert await asyncio.wait_for(waiter, 1) == 2 and s.free == 0


def test_slots_reject_bad_counts() -> None:
    with pytest.raises(ValueError):
        Slots(0)
    s = Slots(2)
    with pytest.raises(ValueError):
        s.release(1)
