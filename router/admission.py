"""Admission that waits: a request no prefill worker can take yet queues here instead of a 429.

``Admission.place(flight, attempt)`` runs ``attempt`` (``Flight.dispatch``). When every worker
refuses it (``Overloaded``), the request joins this router's queue (``router.max_waiting``; full:
429 with ``Retry-After`` estimated from the queue's recent drain rate, 1 to 30 s) and waits
until a worker has room or its first-token deadline passes (504). A request that arrives while
others wait joins them without trying, for HTTP and NATS clients alike. The order
(``router.admission_order``): "fair" (the default), weighted fair sharing of tokens between
tenants (router/fair_queue.py: each tenant's placed prompt + max_tokens over its weight, refunded
at the end for what it did not produce; a tenant below its weighted share of a full queue pushes
out the newest waiter of the one most above it, which gets the 429); or "fifo", first come,
first served.

Waiting is cheap: only the head of the queue tries again, and only when capacity may have
appeared (``wake``: a flight's prefill finished or the flight closed, a prefill worker's
discovery record shows room: ``room_may_have_appeared``), at most every ``MIN_GAP_S``; without
such a signal it tries again after a back-off that doubles from ``BACKOFF_MIN_S`` up to
``router.admission_max_backoff_s`` (capacity freed by other routers is only seen that way). A
placed head wakes the next; so does any change of head (fair order: a join, a charge, a refund).
A waiter that is cancelled (client gone, ``Cancel`` on the bus) or
whose deadline passes leaves at once, freeing its place; if it was the head the next is woken.

A request that a worker may hold (it did not answer in time: ``flight.maybe_taken``) is never
retried here: it fails with the worker's 429, as before, so it cannot run twice.

``AdmissionQueue`` is the pure, synchronous part (bound, drain rate, and its order: ``FifoOrder``
or ``FairOrder``); ``Admission`` adds the waiting. Waiting requests hold their
``router.max_inflight`` slot (see ``Dispatcher.open``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from kvrelay.base.logs import get_logger
from kvrelay.base.tasks import wait_event
from kvrelay.router.config import RouterConfig
from kvrelay.router.errors import Cancelled, DeadlineExceeded, NoWorkersAvailable, Overloaded
from kvrelay.router.fair_queue import FairOrder, FifoOrder, Order
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
    """The waiting requests in ``order`` (default FIFO), bounded by ``capacity``, and when recent ones
    were placed (the drain rate). Pure and synchronous."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic,
                 order: Order | None = None) -> None:
        self.capacity, self.clock = capacity, clock
        self.order: Order = order if order is not None else FifoOrder()
        self._joined: dict[str, float] = {}  # key -> when it joined
        self._placed: deque[float] = deque(maxlen=DRAIN_SAMPLES)

    def __len__(self) -> int:
        return len(self._joined)

    def __contains__(self, key: str) -> bool:
        return key in self._joined

    def join(self, key: str, tenant: str = "") -> str | None:
        """``key`` (of ``tenant``) waits; the waiter it pushed out of a full queue, if any (fair order).
        Raises QueueFull when the queue is full and nobody is pushed out."""
        if key in self._joined:
            return None
        pushed = None
        if len(self._joined) >= self.capacity:
            pushed = self.order.victim(tenant) if self.capacity else None
            if pushed is None:
                raise QueueFull(f"{self.capacity} requests are waiting already")
            self.leave(pushed, placed=False)
        self._joined[key] = self.clock()
        self.order.add(key, tenant)
        return pushed

    def head(self) -> str | None:
        return self.order.head()

    def position(self, key: str) -> int:
        """0 for the head; -1 when ``key`` is not waiting (fair order: see ``FairOrder.position``)."""
        return self.order.position(key)

    def leave(self, key: str, placed: bool) -> float | None:
        """``key`` was placed on a worker (``placed``) or gave up; how long it waited (None: not here)."""
        joined = self._joined.pop(key, None)
        if joined is None:
            return None
        self.order.remove(key)
        now = self.clock()
        if placed:
            self._placed.append(now)
        return now - joined

    def charge(self, tenant: str, tokens: int) -> None:
        """A request of ``tenant`` was placed, charged ``tokens`` (prompt + max_tokens)."""
        self.order.charge(tenant, tokens)

    def refund(self, tenant: str, tokens: int) -> None:
        """A placed request of ``tenant`` ended ``tokens`` short of what it was charged."""
        self.order.refund(tenant, tokens)

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
            return RETRY_AFTER_MAX_S if self._joined else RETRY_AFTER_MIN_S
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil((len(self._joined) + 1) / rate)))


def room_may_have_appeared(old: WorkerInfo | None, new: WorkerInfo | None) -> bool:
    """A discovery record change that may let a waiting request in: a prefill worker that is new,
    stopped draining, or reports less queued work or fewer active requests than before."""
    if new is None or new.draining or new.role not in ("prefill", "both"):
        return False
    return (old is None or old.draining or new.queued_tokens < old.queued_tokens
            or new.active < old.active)


class TenantBook(Protocol):
    """What admission needs of the tenants (``router.tenants.Tenants``): weights and metric labels."""

    def weight(self, tenant: str) -> float: ...
    def label(self, tenant: str) -> str: ...


class OpenTenants:
    """No tenants file: every tenant weighs 1 and is labelled "open" in metrics."""

    def weight(self, tenant: str) -> float:
        return 1.0

    def label(self, tenant: str) -> str:
        return "open"


class _Ticket:
    __slots__ = ("key", "tenant", "event", "last_try", "backoff", "signalled", "cancel_reason", "joined",
                 "pushed_out")

    def __init__(self, key: str, tenant: str, last_try: float, joined: float) -> None:
        self.key, self.tenant, self.last_try, self.joined = key, tenant, last_try, joined
        self.event = asyncio.Event()
        self.backoff, self.signalled, self.cancel_reason, self.pushed_out = BACKOFF_MIN_S, False, "", False

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

    def __init__(self, cfg: RouterConfig, metrics: RouterMetrics, clock: Callable[[], float] = time.monotonic,
                 tenants: TenantBook | None = None) -> None:
        self.cfg, self.metrics, self.clock = cfg, metrics, clock
        self.tenants: TenantBook = tenants if tenants is not None else OpenTenants()
        order = FairOrder(self.tenants.weight) if cfg.admission_order == "fair" else FifoOrder()
        self.queue = AdmissionQueue(cfg.max_waiting, clock, order)
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
                worker = await attempt()
                self._charge(flight)
                return worker
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
        ticket = self._join(flight, last_try)
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
                self._charge(flight)
                return worker
        except _WaitOver:
            raise self.overloaded(f"no prefill worker had room within {max_wait_s:g} s", "wait_bound") from None
        finally:
            self._leave(ticket, placed)

    def _no_worker_deadline(self, t: _Ticket, no_worker: NoWorkersAvailable | None, deadline: float) -> float:
        """While no prefill worker is live, a request waits at most ``router.no_worker_wait_s``."""
        return deadline if no_worker is None else min(deadline, t.joined + self.cfg.no_worker_wait_s)

    def _join(self, flight: Flight, last_try: float) -> _Ticket:
        key, before = flight.request_id, self.queue.head()
        try:
            pushed = self.queue.join(key, flight.tenant)
        except QueueFull:
            raise self.overloaded(f"all prefill workers are busy and the router's admission queue is full "
                                  f"({self.cfg.max_waiting} requests waiting); retry later", "queue_full") from None
        ticket = self._tickets[key] = _Ticket(key, flight.tenant, last_try, self.clock())
        if pushed is not None:
            self._push_out(self._tickets.pop(pushed))
        self.metrics.admission_waiting.set(len(self.queue))
        self._rehead(before)
        return ticket

    def _push_out(self, ticket: _Ticket) -> None:
        """``ticket`` lost its place in the full queue to a tenant below its share: it gets a 429."""
        ticket.pushed_out = True
        ticket.event.set()
        self._observe(ticket, self.clock() - ticket.joined)

    def _leave(self, ticket: _Ticket, placed: bool) -> None:
        before = self.queue.head()
        waited = self.queue.leave(ticket.key, placed)
        if self._tickets.get(ticket.key) is ticket:
            del self._tickets[ticket.key]
        self.metrics.admission_waiting.set(len(self.queue))
        if waited is not None:
            self._observe(ticket, waited)
        self._rehead(before)  # a new head (the next in line) tries at once

    def _observe(self, ticket: _Ticket, waited: float) -> None:
        self.metrics.admission_wait.observe(waited)
        self.metrics.tenant_admission_wait.labels(self.tenants.label(ticket.tenant)).observe(waited)

    def _rehead(self, before: str | None) -> None:
        """Wake the head if it changed (it may be a waiter that was told to wait)."""
        head = self.queue.head()
        if head is not None and head != before:
            self._tickets[head].wake()

    def _charge(self, flight: Flight) -> None:
        """``flight`` was placed: its tenant is charged prompt + max_tokens (fair order)."""
        before = self.queue.head()
        self.queue.charge(flight.tenant, flight.prompt_tokens + flight.max_tokens)
        flight.charged_output = flight.max_tokens
        self._rehead(before)

    def settle(self, flight: Flight) -> None:
        """``flight`` ended (``Dispatcher._closed``): refund the output tokens charged and not produced."""
        unused, flight.charged_output = flight.charged_output - flight.output_tokens, 0
        if unused > 0:
            before = self.queue.head()
            self.queue.refund(flight.tenant, unused)
            self._rehead(before)

    async def _turn(self, t: _Ticket, deadline: float, until: float) -> None:
        """Until ``t`` is the head and may try again: signalled (and ``MIN_GAP_S`` after its last
        try) or its back-off passed. Raises when it is cancelled or a deadline passes."""
        while True:
            if t.cancel_reason:
                raise Cancelled(f"the request was cancelled while waiting for a prefill worker: {t.cancel_reason}")
            if t.pushed_out:
                raise self.overloaded(f"all prefill workers are busy and the router's admission queue is "
                                      f"full ({self.cfg.max_waiting} requests waiting): this request gave its "
                                      f"place to a tenant below its share of the queue; retry later", "pushed_out")
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
