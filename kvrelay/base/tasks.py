"""Background tasks: one owner that cancels and awaits them, and the swallowed-cancel workaround.

On Python < 3.12, ``asyncio.wait_for`` (which nats-py uses for every request, flush and KV
operation) can drop a cancellation that lands as its inner call completes: the task goes on
although ``task.cancelling()`` says a cancel was requested. Every place that cancels a task or
awaits a bus reply goes through the helpers here, so the workaround lives in one module:

- ``cancel_and_wait`` cancels, and cancels again every ``RECANCEL_S`` until the tasks end;
- ``reraise_swallowed_cancel`` delivers a cancel that ``wait_for`` swallowed, after a reply;
- ``wait_event`` waits for an event without ever eating a cancel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable
from typing import Any

from kvrelay.base.logs import get_logger

log = get_logger(__name__)

RECANCEL_S = 2.0
"""How long a cancelled task may take before it is cancelled again."""


def reraise_swallowed_cancel() -> None:
    """Raise ``CancelledError`` when the current task was asked to cancel but is still running."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` s; True when set. A cancel is never swallowed."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout: float = 10.0) -> bool:
    """Cancel ``tasks`` and wait for them, re-cancelling stragglers every ``RECANCEL_S``.

    Waits at most ``timeout`` s in all; tasks still running then are logged. Tasks that ended
    with an exception are logged too. True when every task ended.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    deadline = time.monotonic() + timeout
    while pending:
        for t in pending:
            t.cancel()
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(left, RECANCEL_S))
    for t in pending:
        log.error("task_did_not_stop", task=t.get_name())
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.warning("task_failed", task=t.get_name(), error=repr(t.exception()))
    return not pending


class TaskOwner:
    """Owns background tasks: ``spawn`` tracks them, ``close`` cancels and awaits every one.

    Finished tasks leave the set at once, so it holds only live tasks (bounded by what the
    owner starts: each owner bounds its own concurrency). A task that failed is logged.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", task=task.get_name(), error=repr(task.exception()))

    async def wait(self, tasks: set[asyncio.Task[Any]], timeout: float) -> bool:
        """Wait (bounded) for ``tasks`` to finish on their own; True if they all did."""
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def close(self, timeout: float = 10.0) -> None:
        """Cancel every task and wait for them (at most ``timeout``; stragglers are logged)."""
        await cancel_and_wait(set(self._tasks), timeout)
