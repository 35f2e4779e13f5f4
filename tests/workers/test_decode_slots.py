"""DecodeSlots: local prefills run ahead of pull reservations, never past capacity. No I/O."""

from __future__ import annotations

import asyncio

from kvrelay.workers.pull import DecodeSlots


async def test_decode_slots_local_borrows_a_reserved_slot_and_the_pull_repays_it() -> None:
    s = DecodeSlots(1)
    assert await s.acquire(1, 0.01) == 1  # the pull loop reserves the only slot and fetches
    assert s.take_local(running=0)  # nothing runs: the local prefill borrows the reservation
    assert (s.used, s.borrowed) == (1, 1)
    assert not s.take_local(running=1)  # full
    s.release(1)  # the fetch brought nothing (or its message was returned): repays the borrow
    assert (s.used, s.borrowed, s.free) == (1, 0, 0)  # the slot is the local prefill's now
    s.give_local()
    assert (s.used, s.borrowed, s.free) == (0, 0, 1)


async def test_decode_slots_local_takes_a_free_slot_first() -> None:
    s = DecodeSlots(3)
    assert await s.acquire(2, 0.01) == 2
    assert s.take_local(running=0) and (s.used, s.borrowed) == (3, 0)
    assert s.take_local(running=1) and s.borrowed == 1  # the second one borrows
    s.release(1)  # the pull returns one reserved slot: it repays the borrow instead of freeing
    assert (s.used, s.borrowed, s.free) == (3, 0, 0)
    s.give_local()
    s.give_local()
    assert (s.used, s.free) == (1, 2)  # the pull's other reservation
    s.release(1)
    assert s.used == 0 and s.free == 3


async def test_decode_slots_a_finished_local_prefill_hands_its_slot_to_a_waiting_pull() -> None:
    s = DecodeSlots(1)
    assert s.take_local(running=0) and s.used == 1
    task = asyncio.ensure_future(s.acquire(1, 5.0))
    while not s._waiters:  # let the pull loop queue up (a yield, not a timed wait)
        await asyncio.sleep(0)
    s.give_local()
    assert await task == 1 and s.used == 1


async def test_decode_slots_freed_is_set_whenever_a_running_request_gives_its_slot_back() -> None:
    s = DecodeSlots(1)
    assert await s.acquire(1, 0.01) == 1 and s.take_local(running=0)  # a borrow fills the worker
    assert not s.freed.is_set()
    s.give_local()  # the local prefill ends: the reservation is whole again
    assert s.freed.is_set() and (s.used, s.borrowed) == (1, 0)
    s.freed.clear()
    s.release(0)
    assert not s.freed.is_set()  # nothing given back
    s.release(1)
    assert s.freed.is_set() and s.used == 0
