"""The prefill worker's admission decision and its queue of accepted tasks: pure, synchronous.

The queue is FIFO and bounded twice: at most ``max_tasks`` tasks and ``max_tokens`` prompt tokens.
When a bound (or the export region's free space) would be exceeded the task is *rejected* with
code "overloaded" and never queued: the router tries the next worker (push back, nothing dropped
silently). Cancelled tasks are removed by request id.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kvrelay.schemas.messages import PrefillTask


@dataclass(frozen=True)
class Rejection:
    code: str  # "invalid" | "timeout" | "draining" | "overloaded"
    reason: str


@dataclass
class Queued:
    task: PrefillTask
    blocks: int  # KV blocks the export of this prompt will hold
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return len(self.task.prompt_token_ids)


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class PrefillQueue:
    """Accepted tasks waiting for a runner. Not thread-safe: the worker's event loop owns it."""

    def __init__(self, max_tasks: int, max_tokens: int, block_size: int, max_model_len: int = 0) -> None:
        self.max_model_len = max_model_len  # 0 = unknown: not checked here
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

    def push(self, task: PrefillTask) -> Queued:
        item = Queued(task, blocks_for(len(task.prompt_token_ids), self.block_size))
        self._items[task.request_id] = item
        self.tokens += item.tokens
        self.blocks += item.blocks
        return item

    def pop(self) -> Queued | None:
        if not self._items:
            return None
        _, item = self._items.popitem(last=False)
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
