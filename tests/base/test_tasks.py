"""Task ownership and the swallowed-cancel workaround: every task an owner started is cancelled and
awaited, even one that loses a cancel; waiting for an event never eats a cancel."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.base import tasks
from kvrelay.base.tasks import TaskOwner, cancel_and_wait, wait_event


async def test_task_owner_close_cancels_again_a_task_that_lost_its_cancel(monkeypatch) -> None:
    monkeypatch.setattr(tasks, "RECANCEL_S", 0.05)
    owner, started, lost = TaskOwner("t"), asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # swallowed, as asyncio.wait_for can on Python < 3.12
            lost.set()
        await asyncio.sleep(3600)

    task = owner.spawn(stubborn(), "stubborn")
    await started.wait()
    await asyncio.wait_for(owner.close(timeout=10), 10)
    assert lost.is_set() and task.cancelled() and len(owner) == 0


async def test_task_owner_close_leaves_a_finished_cleanup_alone() -> None:
    owner, started, cleaned = TaskOwner("t"), asyncio.Event(), asyncio.Event()

    async def tidy() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # a cleanup that awaits (well inside RECANCEL_S)
            cleaned.set()
            raise

    owner.spawn(tidy(), "tidy")
    await started.wait()
    await owner.close(timeout=10)
    assert cleaned.is_set() and len(owner) == 0


async def test_wait_event_returns_on_set_or_timeout_and_never_eats_a_cancel() -> None:
    ev = asyncio.Event()
    assert not await wait_event(ev, 0.01)
    ev.set()
    assert await wait_event(ev, 1)
    ev.clear()
    waiter = asyncio.create_task(wait_event(ev, 5))
    await asyncio.sleep(0)
    ev.set()
    waiter.cancel()  # cancelled in the same loop turn as the event is set
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_cancel_and_wait_reports_a_task_that_will_not_stop(monkeypatch) -> None:
    monkeypatch.setattr(tasks, "RECANCEL_S", 0.05)
    refusing, started, cancels = True, asyncio.Event(), []

    async def deaf() -> None:
        started.set()
        while refusing:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels.append(1)

    task = asyncio.create_task(deaf())
    await started.wait()
    assert await cancel_and_wait([task], timeout=0.3) is False
    assert len(cancels) >= 2  # cancelled again, not once
    refusing = False
    task.cancel()
    await asyncio.wait({task})
    assert await cancel_and_wait([task], timeout=1) is True
