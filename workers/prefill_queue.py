"""The prefill worker's admission decision and its queue of accepted tasks: pure, synchronous.

The queue is bounded twice: at most ``max_tasks`` tasks and ``max_tokens`` prompt tokens. When a
bound (or the export region's free space) would be exceeded the task is *rejected* with code
"overloaded" and never queued: the router tries the next worker (push back, nothing dropped
silently). Cancelled tasks are removed by request id.

Which queued task starts next is the ``Schedule``'s (``prefill.schedule``): ``shortest`` (the default)
takes the task with the least work left (prompt tokens not cached by the router's estimate,
``PrefillTask.work_tokens``), so a short prompt does not wait behind long ones (shortest remaining
work first minimises the mean wait); its key shrinks by ``aging_tokens_per_s`` for every second it
waits, and a task passed over ``max_overtakes`` times by younger ones is taken before any of them.
Bounds: a task is taken within (tasks queued ahead of it) + ``max_overtakes`` + 1 takes, and only
tasks arriving less than (its work / ``aging_tokens_per_s``) seconds after it can pass it. ``fifo``
is arrival order. The simulated prefill engine shares the ``Schedule`` for its chunked turns
(``workers/sim/engine.py``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from kvrelay.schemas.messages import PrefillTask
from kvrelay.workers.config import PrefillConfig


class Waiting(Protocol):
    """What a ``Schedule`` reads of a waiting item."""

    queued_at: float  # when it started waiting (monotonic seconds)
    overtaken: int  # times younger items were taken before it

    @property
    def work(self) -> int:  # tokens left to compute
        ...


W = TypeVar("W", bound=Waiting)


@dataclass(frozen=True)
class Schedule:
    """Which waiting item goes next (module doc). Pure: the caller passes the clock."""

    policy: Literal["shortest", "fifo"] = "shortest"
    aging_tokens_per_s: float = 1000.0
    max_overtakes: int = 16

    def pick(self, waiting: MutableSequence[W], now: float) -> int:
        """The index of the next item of ``waiting`` (in arrival order, not empty)."""
        if self.policy == "fifo" or waiting[0].overtaken >= self.max_overtakes:
            return 0  # the oldest was passed over most: it goes first when it has had enough
        aging = self.aging_tokens_per_s
        best, key = 0, None
        for i, w in enumerate(waiting):
            k = w.work - aging * (now - w.queued_at)
            if key is None or k < key:  # ties: the older one
                best, key = i, k
        return best

    def take(self, waiting: MutableSequence[W], now: float) -> W:
        """Remove and return the next item; the older items it passes count one more overtake."""
        i = self.pick(waiting, now)
        for older in waiting[:i]:
            older.overtaken += 1
        return waiting.pop(i)


def schedule_of(cfg: PrefillConfig) -> Schedule:
    return Schedule(cfg.schedule, cfg.aging_tokens_per_s, cfg.max_overtakes)


@dataclass(frozen=True)
class Rejection:
    code: str  # "invalid" | "timeout" | "draining" | "overloaded"
    reason: str


@dataclass
class Queued:
    task: PrefillTask
    blocks: int  # KV blocks the export of this prompt will hold
    queued_at: float = field(default_factory=time.monotonic)
    overtaken: int = 0

    @property
    def tokens(self) -> int:
        return len(self.task.prompt_token_ids)

    @property
    def work(self) -> int:
        return self.task.work_tokens


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class PrefillQueue:
    """Accepted tasks waiting for a runner. Not thread-safe: the worker's event loop owns it."""

    def __init__(self, max_tasks: int, max_tokens: int, block_size: int, max_model_len: int = 0,
                 schedule: Schedule = Schedule()) -> None:
        self.max_model_len = max_model_len  # 0 = unknown: not checked here
        self.schedule = schedule
        self.max_tasks = max_tasks
        self.max_tokens = max_tokens
        self.block_size = block_size
        self._items: OrderedDict[str, Queued] = OrderedDict()
        self.tokens = 0
        self.blocks = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._items

    def check(self, task: PrefillTask, now_ms: int, draining: bool, export_free_blocks: int,
              committed_blocks: int) -> Rejection | None:
        """None if ``task`` may be queued, else why not.

        ``committed_blocks``: export blocks promised to tasks that have not exported yet (the
        running ones); the queued ones are added here.
        """
        if draining:
            return Rejection("draining", "worker is shutting down")
        if task.deadline_ms and task.deadline_ms <= now_ms:
            return Rejection("timeout", f"deadline passed {now_ms - task.deadline_ms} ms ago")
        if task.accept_by_ms and task.accept_by_ms < now_ms:
            return Rejection("timeout", f"the offer expired {now_ms - task.accept_by_ms} ms ago (the router "
                                        "stopped waiting for this reply)")
        n = len(task.prompt_token_ids)
        if self.max_model_len and n + task.sampling.max_tokens > self.max_model_len:
            return Rejection("invalid", f"prompt ({n} tokens) plus max_tokens ({task.sampling.max_tokens}) is "
                                        f"over the model's context of {self.max_model_len} tokens")
        if len(self._items) >= self.max_tasks:
            return Rejection("overloaded", f"queue holds {len(self._items)} tasks (max {self.max_tasks})")
        if self.tokens + n > self.max_tokens and self._items:
            return Rejection("overloaded", f"queue holds {self.tokens} tokens (max {self.max_tokens})")
        need = blocks_for(n, self.block_size) + self.blocks + committed_blocks
        if export_free_blocks < need:
            return Rejection("overloaded",
                             f"export region has {export_free_blocks} free blocks, needs {need}")
        return None

    def push(self, task: PrefillTask, now: float | None = None) -> Queued:
        item = Queued(task, blocks_for(len(task.prompt_token_ids), self.block_size))
        if now is not None:
            item.queued_at = now
        self._items[task.request_id] = item
        self.tokens += item.tokens
        self.blocks += item.blocks
        return item

    def pop(self, now: float | None = None) -> Queued | None:
        """The next task by the schedule (``now``: monotonic seconds, default the clock), or None."""
        if not self._items:
            return None
        if len(self._items) == 1 or self.schedule.policy == "fifo":
            _, item = self._items.popitem(last=False)
        else:
            waiting = list(self._items.values())
            item = self.schedule.take(waiting, time.monotonic() if now is None else now)
            del self._items[item.task.request_id]
        self._forget(item)
        return item

    def remove(self, request_id: str, tenant: str | None = None) -> Queued | None:
        """Take a task out (only ``tenant``'s, when given)."""
        item = self._items.get(request_id)
        if item is None or (tenant is not None and item.task.tenant != tenant):
            return None
        del self._items[request_id]
        if item is not None:
            self._forget(item)
        return item

    def drain(self) -> list[Queued]:
        items = list(self._items.values())
        self._items.clear()
        self.tokens = self.blocks = 0
        return items

    def _forget(self, item: Queued) -> None:
        self.tokens -= item.tokens
        self.blocks -= item.blocks
