"""TaskOwner: every task it started is cancelled and awaited, even one that loses a cancel."""

from __future__ import annotations

import asyncio

from kvrelay.workers import service
from kvrelay.workers.service import TaskOwner


async def test_task_owner_close_cancels_again_a_task_that_lost_its_cancel(monkeypatch) -> None:
    monkeypatch.setattr(service, "RECANCEL_S", 0.05)
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
