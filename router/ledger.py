"""The load ledger: the one owner of dispatch-time load, per request and per worker. Pure, synchronous.

Load is counted when a task is *sent* to a worker, not when the worker reports it: routers
that count only finished work send every burst to one worker. A request's uncached prompt
tokens count against its worker until its first token arrives (prefill done); the request
itself counts against the worker until its final chunk arrives or it fails; its admission
slot is held until its owner releases it.

Per worker the ledger holds three kinds of facts, each written in one place:
- this router's requests (``assign`` / ``unassign`` / ``prefill_done`` / ``release``);
- what the worker reports (heartbeats: queued prompt tokens, active requests), and what other
  routers have in flight there (``remote``, ``router/shared_inflight.py``): both taken in by
  ``views(infos)`` (or ``observe(views)`` for views built elsewhere, or ``report`` for one worker);
- membership: the workers of the last ``views`` / ``observe`` (draining workers left out).

Policies read it through ``views`` (one ``WorkerView`` per member) or through a ``Ranking``
(``ranking(w_queue, w_decode)``): the members kept sorted by their load term, updated by the
ledger whenever a fact above changes, so a decision need not look at every worker.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Sequence
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


class _Worker:
    __slots__ = ("inflight", "tokens", "queued", "active", "r_inflight", "r_tokens", "member", "seen")

    def __init__(self) -> None:
        self.inflight = self.tokens = 0  # this router's requests and their uncached prompt tokens
        self.queued = self.active = 0  # reported by the worker
        self.r_inflight = self.r_tokens = 0  # counted elsewhere (other routers)
        self.member = False
        self.seen = 0  # the ledger's pass that last saw it as a member


class Ranking:
    """The ledger's members sorted by ``w_queue * (queued + in-flight tokens) + w_decode * active``.

    Read-only for its readers (``order``: ``[(cost, worker)]`` ascending; ``costs``: worker ->
    cost); ``members`` is bumped whenever a worker joins or leaves. The ledger keeps it current.
    """

    def __init__(self, w_queue: float, w_decode: float) -> None:
        self.w_queue, self.w_decode = w_queue, w_decode
        self.order: list[tuple[float, str]] = []
        self.costs: dict[str, float] = {}
        self.members = 0

    def __len__(self) -> int:
        return len(self.costs)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self.costs

    def cost(self, worker_id: str) -> float:
        return self.costs[worker_id]

    def _put(self, worker_id: str, queued: int, tokens: int, active: int) -> None:
        cost = self.w_queue * (queued + tokens) + self.w_decode * active
        old = self.costs.get(worker_id)
        if old is None:
            self.members += 1
        elif old == cost:
            return
        else:
            del self.order[bisect_left(self.order, (old, worker_id))]
        self.costs[worker_id] = cost
        insort(self.order, (cost, worker_id))

    def _drop(self, worker_id: str) -> None:
        old = self.costs.pop(worker_id, None)
        if old is not None:
            del self.order[bisect_left(self.order, (old, worker_id))]
            self.members += 1


class LoadLedger:
    """Requests admitted and not yet released, and the load on each worker. See module doc.

    Bounded: at most ``capacity`` requests; ``admit`` past it raises ``InflightFull`` (the
    caller answers 429). Worker records exist only for members and workers with requests in
    flight. Every request method is idempotent for a request that is not (or no longer) here.

    Shared with other routers (``router/shared_inflight.py``): ``listener(kind, request_id,
    worker, tokens)`` hears every change ("dispatched", "prefill_done", "released"), and
    ``remote`` (other routers' loads, ``.load(worker)`` and ``.expire()``) is taken in by ``views``.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._entries: dict[str, _Entry] = {}
        self._workers: dict[str, _Worker] = {}
        self._rankings: list[Ranking] = []
        self._members = 0
        self._pass = 0
        self.listener: Callable[[str, str, str, int], None] | None = None
        self.remote: Any = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    # --- this router's requests --------------------------------------------------------------------
    def admit(self, request_id: str) -> None:
        if request_id in self._entries:
            raise DuplicateRequest(f"request {request_id!r} is already in flight")
        if len(self._entries) >= self.capacity:
            raise InflightFull(f"{self.capacity} requests are in flight through this router")
        self._entries[request_id] = _Entry()

    def assign(self, request_id: str, worker_id: str, num_tokens: int, cached_tokens: int = 0) -> None:
        """The task is being sent to ``worker_id``: count its uncached tokens there (moving it from any other)."""
        entry = self._entries.get(request_id)
        if entry is None:
            return
        self._unassign(entry, request_id)
        entry.worker, entry.tokens = worker_id, max(0, num_tokens - cached_tokens)
        self._add(worker_id, 1, entry.tokens)
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
        tokens, entry.tokens = entry.tokens, 0
        self._add(entry.worker, 0, -tokens)
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
        """(requests in flight, prompt tokens not yet prefilled) this router dispatched to ``worker_id``."""
        w = self._workers.get(worker_id)
        return (w.inflight, w.tokens) if w else (0, 0)

    def pending_tokens(self, worker_id: str) -> int:
        """Prompt tokens ahead of a new task on ``worker_id``: the larger of what it reports queued and
        what the routers sent there and have not seen prefilled (the two overlap; each lags the other)."""
        w = self._workers.get(worker_id)
        return max(w.queued, w.tokens + w.r_tokens) if w else 0

    # --- reported load, other routers, membership ------------------------------------------------------
    def views(self, infos: Iterable[WorkerInfo]) -> list[WorkerView]:
        """Take in the workers' reported load and other routers' counts; the members' views.

        Draining workers are left out: they take no new tasks.
        """
        out = []
        remote = self.remote
        if remote is not None:
            remote.expire()
        this, seen = self._next_pass(), 0
        for info in infos:
            if info.draining:
                continue
            wid = info.worker_id
            r_inflight, r_tokens = remote.load(wid) if remote is not None else (0, 0)
            w = self._observe(wid, info.queued_tokens, info.active, r_inflight, r_tokens)
            if w.seen != this:
                w.seen, seen = this, seen + 1
            out.append(WorkerView(
                worker_id=wid, role=info.role, queued_tokens=info.queued_tokens, active=info.active,
                max_slots=info.max_slots, inflight=w.inflight + r_inflight, inflight_tokens=w.tokens + r_tokens,
            ))
        if seen != self._members:
            self._retire(this)
        return out

    def observe(self, views: Sequence[WorkerView]) -> None:
        """Make ``views`` the members and their load; what they count beyond this router's own
        requests is counted as other routers'. A no-op for the views ``views()`` just returned."""
        workers, this, seen = self._workers, self._next_pass(), 0
        for v in views:
            w = workers.get(v.worker_id)
            if w is None:
                w = self._observe(v.worker_id, v.queued_tokens, v.active, v.inflight, v.inflight_tokens)
            else:
                r_inflight, r_tokens = v.inflight - w.inflight, v.inflight_tokens - w.tokens
                if not (w.member and w.r_tokens == r_tokens and w.queued == v.queued_tokens
                        and w.active == v.active and w.r_inflight == r_inflight):
                    self._observe(v.worker_id, v.queued_tokens, v.active, r_inflight, r_tokens)
            if w.seen != this:
                w.seen, seen = this, seen + 1
        if seen != self._members:
            self._retire(this)

    def report(self, worker_id: str, queued_tokens: int = 0, active: int = 0) -> None:
        """One worker's reported load (it becomes a member); other routers' counts are kept."""
        w = self._workers.get(worker_id)
        r_inflight, r_tokens = (w.r_inflight, w.r_tokens) if w else (0, 0)
        self._observe(worker_id, queued_tokens, active, r_inflight, r_tokens)

    def forget(self, worker_id: str) -> None:
        """The worker is no longer a member (its requests still count until released)."""
        w = self._workers.get(worker_id)
        if w is not None and w.member:
            self._leave(worker_id, w)

    def ranking(self, w_queue: float, w_decode: float) -> Ranking:
        """The members sorted by their load term with these weights, kept current from now on."""
        for r in self._rankings:
            if (r.w_queue, r.w_decode) == (w_queue, w_decode):
                return r
        r = Ranking(w_queue, w_decode)
        for wid, w in self._workers.items():
            if w.member:
                r._put(wid, w.queued, w.tokens + w.r_tokens, w.active)
        self._rankings.append(r)
        return r

    # --- the one place a worker's load changes ------------------------------------------------------
    def _observe(self, worker_id: str, queued: int, active: int, r_inflight: int, r_tokens: int) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            w = self._workers[worker_id] = _Worker()
        elif (w.member and w.queued == queued and w.active == active and w.r_tokens == r_tokens
              and w.r_inflight == r_inflight):
            return w
        if not w.member:
            w.member = True
            self._members += 1
        w.queued, w.active, w.r_inflight, w.r_tokens = queued, active, r_inflight, r_tokens
        for r in self._rankings:
            r._put(worker_id, queued, w.tokens + r_tokens, active)
        return w

    def _add(self, worker_id: str, inflight: int, tokens: int) -> None:
        w = self._workers.get(worker_id)
        if w is None:
            w = self._workers[worker_id] = _Worker()
        w.inflight += inflight
        w.tokens += tokens
        if w.member:
            for r in self._rankings:
                r._put(worker_id, w.queued, w.tokens + w.r_tokens, w.active)
        elif w.inflight <= 0:
            del self._workers[worker_id]

    def _next_pass(self) -> int:
        self._pass += 1
        return self._pass

    def _retire(self, this: int) -> None:
        """Members not seen in pass ``this`` leave."""
        for wid, w in [(wid, w) for wid, w in self._workers.items() if w.member and w.seen != this]:
            self._leave(wid, w)

    def _leave(self, worker_id: str, w: _Worker) -> None:
        w.member, w.queued, w.active, w.r_inflight, w.r_tokens = False, 0, 0, 0, 0
        self._members -= 1
        for r in self._rankings:
            r._drop(worker_id)
        if w.inflight <= 0:
            del self._workers[worker_id]

    def _unassign(self, entry: _Entry, request_id: str) -> None:
        if not entry.worker:
            return
        worker, tokens = entry.worker, entry.tokens
        entry.worker, entry.tokens = "", 0
        self._add(worker, -1, -tokens)
        if self.listener is not None:
            self.listener("released", request_id, worker, 0)
