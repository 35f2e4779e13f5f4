"""What this router has in flight, per request and per worker. Pure, synchronous.

Load is counted when a task is *sent* to a worker, not when the worker reports it: routers
that count only finished work send every burst to one worker. A request's prompt tokens count
against its prefill worker until its first token arrives (prefill done); the request itself
counts against the worker until its final chunk arrives or it fails; its admission slot is
held until its owner closes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvrelay.router.policy import WorkerView
from kvrelay.schemas.messages import WorkerInfo


class InflightFull(Exception):
    """The router has ``capacity`` requests in flight already."""


class DuplicateRequest(Exception):
    """A request with this id is already in flight through this router."""


@dataclass
class _Entry:
    worker: str = ""
    tokens: int = 0  # prompt tokens still counted against ``worker`` (0 once prefill is done)


@dataclass
class _Load:
    inflight: int = 0
    tokens: int = 0


class InflightTable:
    """Requests admitted and not yet released, and the load they put on each worker.

    Bounded: at most ``capacity`` requests; ``admit`` past it raises ``InflightFull`` (the
    caller answers 429). Per-worker loads exist only for workers with requests in flight.
    Every method is idempotent for a request that is not (or no longer) in the table.

    Shared with other routers (``router/shared_inflight.py``): ``listener(kind, request_id,
    worker, tokens)`` hears every change ("dispatched", "prefill_done", "released"), and
    ``remote`` (other routers' loads, ``.load(worker)`` and ``.expire()``) is added in ``views``.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._entries: dict[str, _Entry] = {}
        self._loads: dict[str, _Load] = {}
        self.listener: Callable[[str, str, str, int], None] | None = None
        self.remote: Any = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def admit(self, request_id: str) -> None:
        if request_id in self._entries:
            raise DuplicateRequest(f"request {request_id!r} is already in flight")
        if len(self._entries) >= self.capacity:
            raise InflightFull(f"{self.capacity} requests are in flight through this router")
        self._entries[request_id] = _Entry()

    def assign(self, request_id: str, worker_id: str, tokens: int) -> None:
        """The task is being sent to ``worker_id``: count it there (moving it from any other)."""
        entry = self._entries.get(request_id)
        if entry is None:
            return
        self._unassign(entry, request_id)
        entry.worker, entry.tokens = worker_id, max(0, tokens)
        load = self._loads.setdefault(worker_id, _Load())
        load.inflight += 1
        load.tokens += entry.tokens
        if self.listener is not None:
            self.listener("dispatched", request_id, worker_id, entry.tokens)

    def unassign(self, request_id: str) -> None:
        """The worker refused the task, or the request finished: it no longer counts there."""
        entry = self._entries.get(request_id)
        if entry is not None:
            self._unassign(entry, request_id)

    def prefill_done(self, request_id: str) -> None:
        """The first token arrived: the prompt is no longer queued work on the prefill worker."""
        entry = self._entries.get(request_id)
        if entry is None or not entry.worker:
            return
        self._loads[entry.worker].tokens -= entry.tokens
        entry.tokens = 0
        if self.listener is not None:
            self.listener("prefill_done", request_id, entry.worker, 0)

    def release(self, request_id: str) -> str:
        """The request finished or failed; returns the worker it was counted on ("" if none)."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return ""
        worker = entry.worker
        self._unassign(entry, request_id)
        return worker

    def load(self, worker_id: str) -> tuple[int, int]:
        """(requests in flight, prompt tokens not yet prefilled) dispatched to ``worker_id``."""
        load = self._loads.get(worker_id)
        return (load.inflight, load.tokens) if load else (0, 0)

    def views(self, infos: Iterable[WorkerInfo]) -> list[WorkerView]:
        """Reported load (heartbeats) merged with this router's dispatch-time counts.

        Draining workers are left out: they take no new tasks.
        """
        out = []
        remote = self.remote
        if remote is not None:
            remote.expire()
        for info in infos:
            if info.draining:
                continue
            inflight, tokens = self.load(info.worker_id)
            if remote is not None:
                r_inflight, r_tokens = remote.load(info.worker_id)
                inflight, tokens = inflight + r_inflight, tokens + r_tokens
            out.append(WorkerView(
                worker_id=info.worker_id, role=info.role, queued_tokens=info.queued_tokens,
                active=info.active, max_slots=info.max_slots, inflight=inflight, inflight_tokens=tokens,
            ))
        return out

    def _unassign(self, entry: _Entry, request_id: str) -> None:
        if not entry.worker:
            return
        load = self._loads[entry.worker]
        load.inflight -= 1
        load.tokens -= entry.tokens
        if load.inflight <= 0:
            del self._loads[entry.worker]
        if self.listener is not None:
            self.listener("released", request_id, entry.worker, 0)
        entry.worker, entry.tokens = "", 0
