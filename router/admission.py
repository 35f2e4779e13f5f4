"""Admission that waits: a request no prefill worker can take yet queues here, FIFO, instead of a 429.

``Admission.place(flight, attempt)`` runs ``attempt`` (``Flight.dispatch``). When every worker
refuses it (``Overloaded``), the request joins this router's queue (``router.max_waiting``; full:
429 with ``Retry-After`` estimated from the queue's recent drain rate, 1 to 30 s) and waits
until a worker has room or its first-token deadline passes (504). A request that arrives while
others wait joins behind them without trying: the order is first come, first served, for HTTP
and NATS clients alike.

Waiting is cheap: only the head of the queue tries again, and only when capacity may have
appeared (``wake``: a flight's prefill finished or the flight closed, a prefill worker's
discovery record shows room: ``room_may_have_appeared``), at most every ``MIN_GAP_S``; without
such a signal it tries again after a back-off that doubles from ``BACKOFF_MIN_S`` up to
``router.admission_max_backoff_s`` (capacity freed by other routers is only seen that way). A
placed head wakes the next. A waiter that is cancelled (client gone, ``Cancel`` on the bus) or
whose deadline passes leaves at once, freeing its place; if it was the head the next is woken.

A request that a worker may hold (it did not answer in time: ``flight.maybe_taken``) is never
retried here: it fails with the worker's 429, as before, so it cannot run twice.

``AdmissionQueue`` is the pure, synchronous part (order, bound, drain rate); ``Admission`` adds
the waiting. Waiting requests hold their ``router.max_inflight`` slot (see ``Dispatcher.open``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from kvrelay.base.logs import get_logger
from kvrelay.base.tasks import wait_event
from kvrelay.router.config import RouterConfig
from kvrelay.router.errors import Cancelled, DeadlineExceeded, NoWorkersAvailable, Overloaded
from kvrelay.router.metrics import RouterMetrics
from kvrelay.schemas.messages import WorkerInfo

if TYPE_CHECKING:
    from kvrelay.router.dispatcher import Flight

log = get_logger(__name__)

BACKOFF_MIN_S = 0.05  # the head's first retry without a signal
MIN_GAP_S = 0.01  # the head's retries are at least this far apart, signals or not
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1.0, 30.0
DRAIN_WINDOW_S = 60.0  # placements older than this do not count towards the drain rate
DRAIN_SAMPLES = 64


class QueueFull(Exception):
    """The admission queue holds ``capacity`` waiting requests already."""


class AdmissionQueue:
    """The waiting requests in arrival order, bounded by ``capacity``, and when recent ones were
    placed (the drain rate). Pure and synchronous."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity, self.clock = capacity, clock
        self._order: OrderedDict[str, float] = OrderedDict()  # key -> when it joined
        self._placed: deque[float] = deque(maxlen=DRAIN_SAMPLES)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: str) -> bool:
        return key in self._order

    def join(self, key: str) -> None:
        if key in self._order:
            return
        if len(self._order) >= self.capacity:
            raise QueueFull(f"{self.capacity} requests are waiting already")
        self._order[key] = self.clock()

    def head(self) -> str | None:
        return next(iter(self._order), None)

    def position(self, key: str) -> int:
        """0 for the head; -1 when ``key`` is not waiting."""
        for i, k in enumerate(self._order):
            if k == key:
                return i
        return -1

    def leave(self, key: str, placed: bool) -> float | None:
        """``key`` was placed on a worker (``placed``) or gave up; how long it waited (None: not here)."""
        joined = self._order.pop(key, None)
        if joined is None:
            return None
        now = self.clock()
        if placed:
            self._placed.append(now)
        return now - joined

    def drain_rate(self) -> float | None:
        """Placements per second over the recent ones; None without two of them in the window."""
        now = self.clock()
        while self._placed and now - self._placed[0] > DRAIN_WINDOW_S:
            self._placed.popleft()
        if len(self._placed) < 2:
            return None
        return len(self._placed) / max(now - self._placed[0], 1e-3)

    def retry_after_s(self) -> float:
        """When a request turned away now might find room: the queue's length over its drain rate,
        in [RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S]; the maximum while a queue waits and nothing drained."""
        rate = self.drain_rate()
        if rate is None:
            return RETRY_AFTER_MAX_S if self._order else RETRY_AFTER_MIN_S
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil((len(self._order) + 1) / rate)))


def room_may_have_appeared(old: WorkerInfo | None, new: WorkerInfo | None) -> bool:
    """A discovery record change that may let a waiting request in: a prefill worker that is new,
    stopped draining, or reports less queued work or fewer active requests than before."""
    if new is None or new.draining or new.role not in ("prefill", "both"):
        return False
    return (old is None or old.draining or new.queued_tokens < old.queued_tokens
            or new.active < old.active)


class _Ticket:
    __slots__ = ("key", "event", "last_try", "backoff", "signalled", "cancel_reason", "joined")

    def __init__(self, key: str, last_try: float, joined: float) -> None:
        self.key, self.event, self.last_try, self.joined = key, asyncio.Event(), last_try, joined
        self.backoff, self.signalled, self.cancel_reason = BACKOFF_MIN_S, False, ""

    def refused(self, now: float, max_backoff: float) -> None:
        self.last_try, self.backoff = now, min(max_backoff, self.backoff * 2)

    def wake(self) -> None:
        self.signalled = True
        self.event.set()


class _WaitOver(Exception):
    """The caller's own bound on the wait (not the request's deadline) passed."""


class Admission:
    """This router's admission queue (see module doc): ``place`` a flight, ``wake`` on capacity,
    ``cancel`` a waiter on a bus Cancel, ``on_worker`` for discovery changes."""

    def __init__(self, cfg: RouterConfig, metrics: RouterMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.metrics, self.clock = cfg, metrics, clock
        self.queue = AdmissionQueue(cfg.max_waiting, clock)
        self._tickets: dict[str, _Ticket] = {}

    def __len__(self) -> int:
        return len(self.queue)

    def overloaded(self, message: str, reason: str) -> Overloaded:
        """A 429 for the client, counted, with ``Retry-After`` from the queue's drain rate."""
        self.metrics.admission_rejections.labels(reason).inc()
        return Overloaded(message, retry_after_s=self.queue.retry_after_s())

    async def place(self, flight: Flight, attempt: Callable[[], Awaitable[str]],
                    max_wait_s: float | None = None) -> str:
        """``attempt()`` (dispatch) now, or after waiting its turn; returns the worker that took it.

        ``max_wait_s`` bounds the wait (NATS intake: within the stream's ack wait); past it the
        request gets ``Overloaded``. While no prefill worker is live at all (a restart), it waits
        at most ``router.no_worker_wait_s`` for one to join, then gets ``NoWorkersAvailable``.
        Raises ``Overloaded`` (queue full), ``DeadlineExceeded`` (first-token deadline while
        waiting), ``Cancelled``, and whatever ``attempt`` raises other than a plain refusal."""
        no_worker: NoWorkersAvailable | None = None
        if not self.queue:
            try:
                return await attempt()
            except Overloaded as exc:
                if flight.maybe_taken or self.cfg.max_waiting == 0:
                    raise self.overloaded(exc.message, "refused") from exc
            except NoWorkersAvailable as exc:
                if self.cfg.no_worker_wait_s <= 0 or self.cfg.max_waiting == 0:
                    raise
                no_worker = exc
            last_try = self.clock()
        else:
            last_try = -math.inf  # others wait: join behind them without trying
        ticket = self._join(flight.request_id, last_try)
        return await self._queued(flight, attempt, ticket, no_worker, max_wait_s)

    async def _queued(self, flight: Flight, attempt: Callable[[], Awaitable[str]], ticket: _Ticket,
                      no_worker: NoWorkersAvailable | None, max_wait_s: float | None) -> str:
        """Wait ``ticket``'s turns and attempt until placed; leaves the queue whatever happens."""
        placed = False
        try:
            deadline = min(flight.deadline, flight.started + self.cfg.first_token_timeout_s)
            until = math.inf if max_wait_s is None else self.clock() + max_wait_s
            while True:
                try:
                    await self._turn(ticket, self._no_worker_deadline(ticket, no_worker, deadline), until)
                except DeadlineExceeded:
                    if no_worker is not None:  # no live prefill worker is the more telling reason
                        raise no_worker from None
                    raise
                try:
                    worker = await attempt()
                except Overloaded:
                    if flight.maybe_taken:
                        raise
                    no_worker = None
                    ticket.refused(self.clock(), self.cfg.admission_max_backoff_s)
                    continue
                except NoWorkersAvailable as exc:  # none live: a restart, a scale-up under way
                    no_worker = exc if no_worker is None else no_worker
                    ticket.refused(self.clock(), self.cfg.admission_max_backoff_s)
                    continue
                placed = True
                return worker
        except _WaitOver:
            raise self.overloaded(f"no prefill worker had room within {max_wait_s:g} s", "wait_bound") from None
        finally:
            self._leave(ticket, placed)

    def _no_worker_deadline(self, t: _Ticket, no_worker: NoWorkersAvailable | None, deadline: float) -> float:
        """While no prefill worker is live, a request waits at most ``router.no_worker_wait_s``."""
        return deadline if no_worker is None else min(deadline, t.joined + self.cfg.no_worker_wait_s)

    def _join(self, key: str, last_try: float) -> _Ticket:
        try:
            self.queue.join(key)
        except QueueFull:
            raise self.overloaded(f"all prefill workers are busy and the router's admission queue is full "
                                  f"({self.cfg.max_waiting} requests waiting); retry later", "queue_full") from None
        ticket = self._tickets[key] = _Ticket(key, last_try, self.clock())
        self.metrics.admission_waiting.set(len(self.queue))
        return ticket

    def _leave(self, ticket: _Ticket, placed: bool) -> None:
        was_head = self.queue.head() == ticket.key
        waited = self.queue.leave(ticket.key, placed)
        self._tickets.pop(ticket.key, None)
        self.metrics.admission_waiting.set(len(self.queue))
        if waited is not None:
            self.metrics.admission_wait.observe(waited)
        if was_head:
            self.wake()  # the next in line tries at once

    async def _turn(self, t: _Ticket, deadline: float, until: float) -> None:
        """Until ``t`` is the head and may try again: signalled (and ``MIN_GAP_S`` after its last
        try) or its back-off passed. Raises when it is cancelled or a deadline passes."""
        while True:
            if t.cancel_reason:
                raise Cancelled(f"the request was cancelled while waiting for a prefill worker: {t.cancel_reason}")
            now = self.clock()
            if now >= deadline:
                self.metrics.admission_rejections.labels("deadline").inc()
                raise DeadlineExceeded(
                    f"no prefill worker had room for the request before its first-token deadline: it waited "
                    f"{now - t.joined:.3g} s in the router's admission queue (position "
                    f"{self.queue.position(t.key) + 1} of {len(self.queue)})")
            if now >= until:
                raise _WaitOver()
            wait = min(deadline, until) - now
            if self.queue.head() == t.key:
                due = t.last_try + (MIN_GAP_S if t.signalled else t.backoff)
                if now >= due:
                    t.signalled = False
                    return
                wait = min(wait, due - now)
            t.event.clear()
            await wait_event(t.event, wait)

    # --- signals ------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Capacity may have appeared: the head tries again (no sooner than ``MIN_GAP_S`` after its last try)."""
        head = self.queue.head()
        if head is not None:
            self._tickets[head].wake()

    def on_worker(self, old: WorkerInfo | None, new: WorkerInfo | None) -> None:
        """A discovery record changed (``Directory.listeners``)."""
        if self.queue and room_may_have_appeared(old, new):
            self.wake()

    def cancel(self, request_id: str, reason: str) -> None:
        """A Cancel was seen for ``request_id``: if it waits here, it leaves."""
        ticket = self._tickets.get(request_id)
        if ticket is not None:
            ticket.cancel_reason = reason or "cancelled"
            ticket.event.set()
