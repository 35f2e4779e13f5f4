"""Admission that waits (router/admission.py): the pure queue, and ``Admission.place`` with fake
flights and dispatch attempts, no I/O. Over HTTP and NATS: tests/router/test_admission_http.py."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from kvrelay.router.admission import (
    RETRY_AFTER_MAX_S,
    RETRY_AFTER_MIN_S,
    Admission,
    AdmissionQueue,
    QueueFull,
    room_may_have_appeared,
)
from kvrelay.router.config import RouterConfig
from kvrelay.router.errors import Cancelled, DeadlineExceeded, NoWorkersAvailable, Overloaded
from kvrelay.router.metrics import RouterMetrics
from kvrelay.schemas.messages import WorkerInfo


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_admission_queue_is_fifo_bounded_and_idempotent_on_leave() -> None:
    q = AdmissionQueue(2, Clock())
    q.join("a")
    q.join("b")
    with pytest.raises(QueueFull):
        q.join("c")
    assert q.head() == "a" and q.position("b") == 1 and q.position("c") == -1
    assert q.leave("a", placed=True) == 0.0
    assert q.leave("a", placed=True) is None
    assert q.head() == "b"
    q.join("c")
    assert [q.head(), q.position("c")] == ["b", 1]


def test_admission_queue_retry_after_follows_the_drain_rate_within_bounds() -> None:
    clock = Clock()
    q = AdmissionQueue(100, clock)
    assert q.retry_after_s() == RETRY_AFTER_MIN_S  # nobody waits
    q.join("w")
    assert q.retry_after_s() == RETRY_AFTER_MAX_S  # waiting, and nothing drained yet
    for i in range(4):  # 4 placed in 2 s: 2 per second
        q.join(f"p{i}")
        clock.now += 0.5
        q.leave(f"p{i}", placed=True)
    for i in range(9):
        q.join(f"x{i}")
    assert len(q) == 10
    assert q.retry_after_s() == math.ceil(11 / (4 / 1.5))  # the 11th in line, at the recent rate
    clock.now += 1000  # the placements are old news
    assert q.retry_after_s() == RETRY_AFTER_MAX_S
    for i in range(9):
        q.leave(f"x{i}", placed=False)  # gave up: not a drain
    assert q.drain_rate() is None


def _info(**kw) -> WorkerInfo:
    return WorkerInfo(**({"worker_id": "p", "role": "prefill", "model": "m", "host": "h", "block_size": 32} | kw))


def test_admission_room_may_have_appeared_on_a_new_undrained_or_lighter_prefill_worker() -> None:
    busy = _info(queued_tokens=100, active=4)
    assert room_may_have_appeared(None, busy)
    assert room_may_have_appeared(_info(draining=True), busy)
    assert room_may_have_appeared(busy, _info(queued_tokens=50, active=4))
    assert room_may_have_appeared(busy, _info(queued_tokens=100, active=3))
    assert not room_may_have_appeared(busy, busy)  # a plain heartbeat
    assert not room_may_have_appeared(busy, _info(queued_tokens=200, active=4))
    assert not room_may_have_appeared(busy, None)  # left
    assert not room_may_have_appeared(busy, _info(draining=True))
    assert not room_may_have_appeared(None, _info(role="decode"))


class Flight:
    def __init__(self, rid: str, budget_s: float = 60.0, tenant: str = "default", prompt_tokens: int = 0,
                 max_tokens: int = 0) -> None:
        self.request_id, self.maybe_taken, self.tenant = rid, False, tenant
        self.started = time.monotonic()  # the admission clock
        self.deadline = self.started + budget_s
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.output_tokens = self.charged_output = 0


class Workers:
    """Fake dispatch: takes a request while ``room`` > 0, else refuses (Overloaded)."""

    def __init__(self, room: int = 0) -> None:
        self.room, self.tries, self.placed = room, 0, []

    def attempt(self, flight: Flight):
        async def go() -> str:
            self.tries += 1
            if self.room <= 0:
                raise Overloaded("all prefill workers are busy")
            self.room -= 1
            self.placed.append(flight.request_id)
            return "w"
        return go


def _admission(**cfg) -> tuple[Admission, RouterMetrics]:
    metrics = RouterMetrics()
    return Admission(RouterConfig(**({"admission_max_backoff_s": 60.0} | cfg)), metrics), metrics


async def _until(cond, timeout: float = 5.0) -> None:
    """Poll ``cond`` (the head retries no sooner than MIN_GAP_S after its last try)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def test_admission_waiters_are_placed_in_arrival_order_one_wake_at_a_time() -> None:
    adm, metrics = _admission()
    workers = Workers()
    flights = [Flight(f"r{i}") for i in range(5)]
    tasks = []
    for f in flights:
        tasks.append(asyncio.create_task(adm.place(f, workers.attempt(f))))
        await _until(lambda: f.request_id in adm.queue)
    assert workers.tries == 1  # only the first tried: the rest joined behind it
    assert metrics.admission_waiting._value.get() == 5
    workers.room = 5
    adm.wake()  # one signal: each placed head wakes the next
    assert await asyncio.gather(*tasks) == ["w"] * 5
    assert workers.placed == [f.request_id for f in flights] and workers.tries == 6
    assert len(adm) == 0 and metrics.admission_waiting._value.get() == 0


async def test_admission_a_signal_wakes_only_the_head() -> None:
    adm, _ = _admission()
    workers = Workers()
    flights = [Flight(f"r{i}") for i in range(3)]
    tasks = [asyncio.create_task(adm.place(f, workers.attempt(f))) for f in flights]
    await _until(lambda: len(adm) == 3)
    tries = workers.tries
    adm.wake()
    await _until(lambda: workers.tries == tries + 1)
    for _ in range(50):
        await asyncio.sleep(0)
    assert workers.tries == tries + 1 and len(adm) == 3  # the head was refused; nobody else tried
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert len(adm) == 0


async def test_admission_full_queue_is_429_and_no_waiting_when_max_waiting_is_0() -> None:
    adm, metrics = _admission(max_waiting=1)
    workers = Workers()
    a, b = Flight("a"), Flight("b")
    first = asyncio.create_task(adm.place(a, workers.attempt(a)))
    await _until(lambda: len(adm) == 1)
    with pytest.raises(Overloaded, match="admission queue is full") as exc:
        await adm.place(b, workers.attempt(b))
    assert exc.value.retry_after_s >= 1 and workers.tries == 1  # b did not jump the queue
    assert metrics.admission_rejections.labels("queue_full")._value.get() == 1
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    none, _ = _admission(max_waiting=0)
    with pytest.raises(Overloaded, match="all prefill workers are busy"):
        await none.place(a, workers.attempt(a))


async def test_admission_a_request_a_worker_may_hold_is_not_retried() -> None:
    adm, _ = _admission()
    f = Flight("a")

    async def silent() -> str:
        f.maybe_taken = True  # a worker did not answer in time: it may run the task
        raise Overloaded("all prefill workers are busy (1 tried: timeout)")

    with pytest.raises(Overloaded):
        await adm.place(f, silent)
    assert len(adm) == 0


async def test_admission_a_waiter_past_its_first_token_deadline_gets_504() -> None:
    adm, metrics = _admission(first_token_timeout_s=0.1)
    workers = Workers()
    f = Flight("a", budget_s=60.0)  # the first-token deadline comes first
    with pytest.raises(DeadlineExceeded, match="admission queue"):
        await adm.place(f, workers.attempt(f))
    assert len(adm) == 0 and metrics.admission_rejections.labels("deadline")._value.get() == 1
    assert metrics.admission_wait._sum.get() > 0


async def test_admission_cancel_frees_the_place_and_wakes_the_next() -> None:
    adm, metrics = _admission()
    workers = Workers()
    a, b = Flight("a"), Flight("b")
    ta = asyncio.create_task(adm.place(a, workers.attempt(a)))
    await _until(lambda: len(adm) == 1)
    tb = asyncio.create_task(adm.place(b, workers.attempt(b)))
    await _until(lambda: len(adm) == 2)
    workers.room = 1
    adm.cancel("a", "client gone")  # a Cancel on the bus for the head
    with pytest.raises(Cancelled):
        await ta
    assert await tb == "w" and workers.placed == ["b"]  # woken by a's leaving, no signal needed
    assert metrics.admission_waiting._value.get() == 0


async def test_admission_errors_other_than_refusal_end_the_wait() -> None:
    adm, _ = _admission()
    workers = Workers()
    a = Flight("a")
    task = asyncio.create_task(adm.place(a, workers.attempt(a)))
    await _until(lambda: len(adm) == 1)

    async def gone() -> str:
        raise NoWorkersAvailable("no prefill worker is available")

    b = Flight("b")
    tb = asyncio.create_task(adm.place(b, gone))
    await _until(lambda: len(adm) == 2)
    task.cancel()
    with pytest.raises(NoWorkersAvailable):
        await tb
    assert len(adm) == 0


async def test_admission_waits_a_bounded_time_for_a_prefill_worker_to_join() -> None:
    adm, _ = _admission(admission_max_backoff_s=0.05)
    live: list[str] = []

    async def dispatch() -> str:
        if not live:
            raise NoWorkersAvailable("no prefill worker is available")
        return live[0]

    waiting = asyncio.create_task(adm.place(Flight("r1"), dispatch))
    await _until(lambda: len(adm) == 1)  # a restart under way: it waits instead of a 503
    live.append("p0")  # the restarted worker joined
    adm.on_worker(None, _info(worker_id="p0"))
    assert await asyncio.wait_for(waiting, 5) == "p0"

    adm, _ = _admission(no_worker_wait_s=0.1, admission_max_backoff_s=0.02)
    live.clear()
    with pytest.raises(NoWorkersAvailable, match="no prefill worker"):  # none joined in time: 503
        await asyncio.wait_for(adm.place(Flight("r2"), dispatch), 5)
    assert len(adm) == 0

    adm, _ = _admission(no_worker_wait_s=0.0)
    with pytest.raises(NoWorkersAvailable):  # 0: at once, as before
        await adm.place(Flight("r3"), dispatch)
