"""Weighted fair admission order (router/fair_queue.py, VTC) and its use by the admission queue
(router/admission.py): pure state machines driven step by step, then ``Admission.place`` with fake
flights and dispatch attempts. No I/O, no sleeps."""

from __future__ import annotations

import asyncio
import random

import pytest

from kvrelay.router.admission import Admission, AdmissionQueue, QueueFull
from kvrelay.router.config import RouterConfig
from kvrelay.router.errors import Overloaded
from kvrelay.router.fair_queue import FairOrder, FifoOrder
from kvrelay.router.metrics import RouterMetrics


def _serve(order: FairOrder, cost: dict[str, int] | None = None) -> str:
    """Place the head: charge its tenant and take it out; returns the key."""
    key = order.head()
    assert key is not None
    tenant = key.split("-")[0]
    order.charge(tenant, (cost or {}).get(tenant, 100))
    order.remove(key)
    return key


def _fill(order: FairOrder, tenant: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        order.add(f"{tenant}-{i}", tenant)


def test_fair_order_equal_weights_interleave() -> None:
    order = FairOrder()
    _fill(order, "a", 4)
    _fill(order, "b", 4)
    served = [_serve(order) for _ in range(8)]
    assert served == ["a-0", "b-0", "a-1", "b-1", "a-2", "b-2", "a-3", "b-3"]
    assert len(order) == 0 and order.head() is None


def test_fair_order_weights_2_to_1_give_2_to_1_token_shares_while_both_backlogged() -> None:
    weights = {"a": 2.0, "b": 1.0}
    order = FairOrder(weights.__getitem__)
    rng = random.Random(7)
    sizes = {"a": lambda: rng.randint(20, 200), "b": lambda: rng.randint(100, 1000)}  # b's are bigger
    _fill(order, "a", 2000)
    _fill(order, "b", 2000)
    tokens = {"a": 0, "b": 0}
    for _ in range(1500):  # both stay backlogged throughout
        key = order.head()
        assert key is not None
        tenant = key.split("-")[0]
        n = sizes[tenant]()
        order.charge(tenant, n)
        order.remove(key)
        tokens[tenant] += n
    assert 1.9 <= tokens["a"] / tokens["b"] <= 2.1, tokens
    # VTC's bound: weighted service differs by at most one request's worth
    assert abs(tokens["a"] / 2 - tokens["b"]) <= 1000, tokens


def test_fair_order_a_flooding_tenant_delays_a_light_one_by_at_most_one_request() -> None:
    order = FairOrder()
    _fill(order, "flood", 500)
    rng = random.Random(3)
    light: dict[str, int] = {}  # light waiters, oldest first -> flood placements while it was the oldest
    waits, n = [], 0
    for _ in range(400):
        if rng.random() < 0.3:  # the light tenant sends below its share of tokens, sometimes two at once
            for _ in range(rng.choice((1, 1, 2))):
                light[f"light-{n}"] = 0
                order.add(f"light-{n}", "light")
                n += 1
        key = _serve(order, {"flood": 500, "light": 300})
        if key.startswith("light"):
            assert key == next(iter(light))  # first come, first served within a tenant
            waits.append(light.pop(key))
        elif light:
            light[next(iter(light))] += 1
    assert len(waits) > 100 and len(order) == 500 - 400 + len(waits) + len(light)
    assert max(waits) <= 1, max(waits)


def test_fair_order_a_newly_backlogged_tenant_gets_no_banked_credit() -> None:
    order = FairOrder()
    _fill(order, "a", 30)
    for _ in range(10):  # a alone for a while: b was idle, not owed anything
        _serve(order)
    assert order.counter("a") == 1000 and order.counter("b") is None
    _fill(order, "b", 10)
    assert order.counter("b") == 1000  # lifted to the smallest backlogged counter
    served = [_serve(order)[0] for _ in range(8)]
    assert served == ["b", "a"] * 4  # shares from here on, not ten b's in a row
    # idle again, then back while nobody waits: lifted to the counter of the tenant served last
    while len(order):
        _serve(order)
    last = max(order.counter("a") or 0, order.counter("b") or 0)
    order.charge("c", 0)  # c placed at once (no queue): counted from the current level
    assert order.counter("c") == last


def test_fair_order_refund_returns_unused_output_but_never_below_the_lift() -> None:
    order = FairOrder()
    _fill(order, "a", 3)
    _serve(order)  # a: 100
    order.charge("b", 60)  # b placed at once: lifted to a's 100, then 160
    assert order.counter("b") == 160
    order.refund("b", 50)
    assert order.counter("b") == 110
    order.refund("b", 500)  # more than charged since its lift: down to the lift, no credit
    assert order.counter("b") == 100
    order.refund("nobody", 10)  # unknown tenant: nothing happens
    assert order.counter("nobody") is None


def test_fair_order_state_is_bounded() -> None:
    order = FairOrder(max_idle=16)
    for i in range(1000):  # many tenants, each placed at once and then idle
        order.charge(f"t{i}", 10)
    assert order.tenants() == 16
    q = AdmissionQueue(4, order=FairOrder(max_idle=16))
    for i in range(4):
        q.join(f"x{i}-0", f"x{i}")
    for i in range(4, 50):  # every tenant holds its share (one place each): the rest are turned away
        with pytest.raises(QueueFull):
            q.join(f"x{i}-0", f"x{i}")
    assert len(q) == 4 and q.order.tenants() == 4


def test_fair_admission_queue_full_pushes_out_the_newest_of_the_tenant_most_over_its_share() -> None:
    q = AdmissionQueue(4, order=FairOrder({"flood": 1.0, "light": 1.0}.__getitem__))
    for i in range(4):
        assert q.join(f"flood-{i}", "flood") is None
    with pytest.raises(QueueFull):
        q.join("flood-4", "flood")  # its own tenant holds the most: turned away
    assert q.join("light-0", "light") == "flood-3"  # the flood's newest gives its place
    assert q.join("light-1", "light") == "flood-2"
    with pytest.raises(QueueFull):
        q.join("light-2", "light")  # 2 and 2: light holds its share
    assert len(q) == 4 and "flood-3" not in q and q.leave("flood-3", placed=False) is None
    assert q.head() == "flood-0"  # light lifted to flood's counter, as many waiters: the oldest first


def test_fifo_order_keeps_arrival_order_and_never_pushes_out() -> None:
    q = AdmissionQueue(3, order=FifoOrder())
    for key, tenant in (("f0", "flood"), ("f1", "flood"), ("l0", "light")):
        q.join(key, tenant)
    with pytest.raises(QueueFull):
        q.join("l1", "light")
    q.charge("flood", 10**6)  # no effect on the order
    assert [q.head(), q.position("l0")] == ["f0", 2]


# --- Admission.place with fake flights ----------------------------------------------------------------
class Flight:
    def __init__(self, rid: str, tenant: str, prompt_tokens: int = 10, max_tokens: int = 100) -> None:
        self.request_id, self.tenant, self.maybe_taken = rid, tenant, False
        self.started = asyncio.get_running_loop().time()  # the admission clock (monotonic)
        self.deadline = self.started + 60.0
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.output_tokens = self.charged_output = 0


class Workers:
    """Fake dispatch: takes a request while ``room`` > 0, else refuses (Overloaded)."""

    def __init__(self) -> None:
        self.room, self.placed = 0, []

    def attempt(self, flight: Flight):
        async def go() -> str:
            if self.room <= 0:
                raise Overloaded("all prefill workers are busy")
            self.room -= 1
            self.placed.append(flight.request_id)
            return "w"
        return go


class Book:
    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = weights

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def label(self, tenant: str) -> str:
        return tenant if tenant in self.weights else "open"


async def _settle(cond) -> None:
    """Let the event loop run until ``cond`` (no sleeping: bounded number of loop turns)."""
    for _ in range(10_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def _queue_up(adm: Admission, workers: Workers, flights: list[Flight]) -> list[asyncio.Task]:
    tasks = []
    for f in flights:
        tasks.append(asyncio.create_task(adm.place(f, workers.attempt(f))))
        await _settle(lambda: f.request_id in adm.queue)
    return tasks


@pytest.mark.parametrize("order", ["fair", "fifo"])
async def test_admission_fair_puts_a_light_request_before_a_flood_and_fifo_keeps_arrival_order(
        order: str) -> None:
    adm = Admission(RouterConfig(admission_order=order, admission_max_backoff_s=60.0), RouterMetrics())
    workers = Workers()
    flights = [Flight(f"f{i}", "flood") for i in range(5)] + [Flight("l0", "light")]
    tasks = await _queue_up(adm, workers, flights)
    workers.room = 6
    adm.wake()
    assert await asyncio.gather(*tasks) == ["w"] * 6
    floods = ["f0", "f1", "f2", "f3", "f4"]
    expected = ["l0", *floods] if order == "fair" else [*floods, "l0"]
    assert workers.placed == expected


async def test_admission_pushed_out_waiter_gets_429_and_waits_are_labelled_by_tenant() -> None:
    metrics = RouterMetrics()
    adm = Admission(RouterConfig(max_waiting=2, admission_max_backoff_s=60.0), metrics,
                    tenants=Book({"alice": 1.0, "bob": 1.0}))
    workers = Workers()
    a0, a1, b0 = Flight("a0", "alice"), Flight("a1", "alice"), Flight("b0", "bob")
    ta0, ta1 = await _queue_up(adm, workers, [a0, a1])
    tb0 = asyncio.create_task(adm.place(b0, workers.attempt(b0)))
    with pytest.raises(Overloaded, match="gave its place") as exc:
        await ta1
    assert exc.value.retry_after_s >= 1
    assert metrics.admission_rejections.labels("pushed_out")._value.get() == 1
    assert len(adm) == 2 and "b0" in adm.queue
    workers.room = 2
    adm.wake()
    assert await asyncio.gather(ta0, tb0) == ["w", "w"]
    wait = metrics.registry.get_sample_value
    assert wait("kvrelay_router_tenant_admission_wait_seconds_count", {"tenant": "alice"}) == 2
    assert wait("kvrelay_router_tenant_admission_wait_seconds_count", {"tenant": "bob"}) == 1


async def test_admission_charges_prompt_plus_max_tokens_and_settle_refunds_the_unused_output() -> None:
    adm = Admission(RouterConfig(), RouterMetrics(), tenants=Book({"alice": 2.0}))
    workers = Workers()
    workers.room = 1
    f = Flight("a0", "alice", prompt_tokens=40, max_tokens=100)
    assert await adm.place(f, workers.attempt(f)) == "w"  # placed at once: charged all the same
    order = adm.queue.order
    assert isinstance(order, FairOrder)
    assert order.counter("alice") == 70 and f.charged_output == 100  # (40 + 100) / weight 2
    f.output_tokens = 30  # it stopped early
    adm.settle(f)
    assert order.counter("alice") == 35 and f.charged_output == 0
    adm.settle(f)  # once only
    assert order.counter("alice") == 35


async def test_admission_a_refund_that_changes_the_head_wakes_the_new_head() -> None:
    adm = Admission(RouterConfig(admission_max_backoff_s=60.0), RouterMetrics())
    workers = Workers()
    workers.room = 2
    done = [Flight("a-done", "a", max_tokens=1000), Flight("b-done", "b", max_tokens=1000)]
    for f in done:  # both placed at once: a at 1010, then b lifted to 1010 and charged: 2020
        await adm.place(f, workers.attempt(f))
    tasks = await _queue_up(adm, workers, [Flight("a1", "a"), Flight("b1", "b")])
    assert adm.queue.head() == "a1"
    workers.room = 1
    adm.settle(done[1])  # b produced nothing: 1000 refunded (2020 -> 1020); b1 now goes first
    assert await tasks[1] == "w" and workers.placed[-1] == "b1"
    tasks[0].cancel()
    await asyncio.gather(tasks[0], return_exceptions=True)
    assert len(adm) == 0
