"""Arrival processes and the driver, on a virtual clock (a fake send advances it; nothing sleeps)."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.loadtest.arrivals import Arrival, ArrivalError, Driver, drive, parse_arrival, poisson_times
from kvrelay.loadtest.metrics import RequestRecord
from kvrelay.loadtest.plan import BenchRequest, SessionPlan, from_workload
from kvrelay.loadtest.workloads import generate


class FakeServer:
    """Each request takes ``service_s`` of virtual time; tracks requests in flight."""

    def __init__(self, service_s: float = 1.0, fail: set[str] | None = None) -> None:
        self.now = 100.0
        self.service_s, self.fail = service_s, fail or set()
        self.inflight = self.max_inflight = 0
        self.sent: list[tuple[str, float, float]] = []  # (id, scheduled, sent)

    def clock(self) -> float:
        return self.now

    async def sleep(self, dt: float) -> None:
        self.now += dt
        await asyncio.sleep(0)

    async def send(self, req: BenchRequest, scheduled_s: float) -> RequestRecord:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        self.sent.append((req.request_id, scheduled_s, self.now))
        for _ in range(3):
            await asyncio.sleep(0)  # let every other ready user send before this one finishes
        self.now += self.service_s
        self.inflight -= 1
        rec = RequestRecord(req.request_id, scheduled_s, scheduled_s, chunks=[(self.now, 1)], end_s=self.now)
        if req.request_id in self.fail:
            rec.error = "http_500"
        return rec


def _plans(n: int, steps: int = 1, start_gap: float = 0.0, delay: float = 0.0) -> list[SessionPlan]:
    return [SessionPlan(f"s{i}", i * start_gap,
                        [BenchRequest(f"s{i}-{j}", [1, 2, 3], 4, delay_s=delay if j else 0.0)
                         for j in range(steps)])
            for i in range(n)]


@pytest.mark.parametrize("spec, want", [
    ("concurrency:8", Arrival("concurrency", 8.0)), ("poisson:2.5", Arrival("poisson", 2.5)),
    ("trace", Arrival("trace")), ("Poisson:1", Arrival("poisson", 1.0)),
])
def test_parse_arrival_good(spec: str, want: Arrival) -> None:
    assert parse_arrival(spec) == want


@pytest.mark.parametrize("spec", ["concurrency:0", "concurrency:2.5", "poisson:0", "poisson:-1", "poisson:x",
                                  "burst:3", "trace:5", "poisson", "poisson:inf"])
def test_parse_arrival_bad(spec: str) -> None:
    with pytest.raises(ArrivalError):
        parse_arrival(spec)


def test_poisson_times_seeded_increasing_mean_rate() -> None:
    t = poisson_times(20000, rate=4.0, seed=1)
    assert t == poisson_times(20000, rate=4.0, seed=1)
    assert t != poisson_times(20000, rate=4.0, seed=2)
    assert t[0] == 0.0 and all(b >= a for a, b in zip(t, t[1:]))
    assert t[-1] / (len(t) - 1) == pytest.approx(0.25, rel=0.03)
    assert poisson_times(0, 1.0, 0) == []
    with pytest.raises(ArrivalError):
        poisson_times(3, 0.0, 0)


async def test_driver_closed_loop_bounds_and_fills_concurrency() -> None:
    srv = FakeServer()
    d = Driver(srv.send, clock=srv.clock, sleep=srv.sleep)
    recs = await d.run_closed(_plans(10), users=3)
    assert len(recs) == 10 and srv.max_inflight == 3


async def test_driver_closed_loop_runs_session_steps_in_order_after_pauses() -> None:
    srv = FakeServer(service_s=1.0)
    d = Driver(srv.send, clock=srv.clock, sleep=srv.sleep)
    await d.run_closed(_plans(2, steps=3, delay=5.0), users=2)
    by_session: dict[str, list[tuple[str, float, float]]] = {}
    for rid, sched, sent in srv.sent:
        by_session.setdefault(rid.split("-")[0], []).append((rid, sched, sent))
    for steps in by_session.values():
        assert [s[0].split("-")[1] for s in steps] == ["0", "1", "2"]
        # each later step is scheduled >= 5 s (its pause) after the previous one was sent + served
        for (_, _, sent_a), (_, sched_b, _) in zip(steps, steps[1:]):
            assert sched_b >= sent_a + 1.0 + 5.0


async def test_driver_pause_scale_zero_removes_pauses() -> None:
    srv = FakeServer(service_s=1.0)
    d = Driver(srv.send, clock=srv.clock, sleep=srv.sleep, pause_scale=0.0)
    await d.run_closed(_plans(1, steps=3, delay=5.0), users=1)
    assert [s[1] for s in srv.sent] == [100.0, 101.0, 102.0]


async def test_driver_open_loop_schedules_at_plan_starts() -> None:
    srv = FakeServer(service_s=0.0)
    d = Driver(srv.send, clock=srv.clock, sleep=srv.sleep)
    plans = _plans(4, start_gap=-1.0)  # starts 0, -1, -2, -3 s: all due at once, sorted by start
    recs = await d.run_open(plans)
    assert sorted(r.scheduled_s - d.t0 for r in recs) == [-3.0, -2.0, -1.0, 0.0]


async def test_driver_open_loop_late_sends_keep_scheduled_time() -> None:
    srv = FakeServer(service_s=2.0)
    d = Driver(srv.send, clock=srv.clock, sleep=srv.sleep, max_inflight=1)
    recs = await d.run_open(_plans(3, start_gap=0.0))
    assert [r.scheduled_s for r in recs] == [100.0, 100.0, 100.0]
    assert [s[2] for s in srv.sent] == [100.0, 102.0, 104.0]  # sent one after another
    assert d.late == 2 and srv.max_inflight == 1


async def test_driver_stops_at_max_requests() -> None:
    srv = FakeServer()
    d = Driver(srv.send, clock=srv.clock, sleep=srv.sleep, max_requests=5)
    recs = await d.run_closed(_plans(4, steps=3), users=2)
    assert len(recs) == 5 and d.scheduled == 5


async def test_driver_stops_scheduling_at_duration() -> None:
    srv = FakeServer(service_s=0.0)
    d = Driver(srv.send, clock=srv.clock, sleep=srv.sleep, duration_s=10.0)
    starts = [0.0, 9.9, 10.0, 50.0]
    plans = [SessionPlan(f"s{i}", t, [BenchRequest(f"s{i}-0", [1], 1)]) for i, t in enumerate(starts)]
    recs = await d.run_open(plans)
    assert [r.request_id for r in recs] == ["s0-0", "s1-0"]  # 10.0 and 50.0 are at/after the 10 s limit


async def test_driver_failed_step_ends_its_session() -> None:
    srv = FakeServer(fail={"s0-1"})
    d = Driver(srv.send, clock=srv.clock, sleep=srv.sleep)
    recs = await d.run_closed(_plans(2, steps=3), users=1)
    assert [r.request_id for r in recs] == ["s0-0", "s0-1", "s1-0", "s1-1", "s1-2"]


async def test_drive_poisson_workload_end_to_end() -> None:
    wl = generate("cot", seed=2, max_requests=6).with_rate(2.0)
    plans = from_workload(wl)
    srv = FakeServer(service_s=0.0)
    srv.now = 0.0
    d = await drive(srv.send, plans, Arrival("poisson", 2.0), clock=srv.clock, sleep=srv.sleep)
    assert len(d.records) == 6
    assert sorted(round(r.scheduled_s, 9) for r in d.records) == sorted(round(p.start_s, 9) for p in plans)


def test_driver_rejects_bad_bounds() -> None:
    srv = FakeServer()
    with pytest.raises(ArrivalError):
        Driver(srv.send, max_inflight=0)
    with pytest.raises(ArrivalError):
        Driver(srv.send, pause_scale=-1)


def test_from_workload_steps_carry_their_session_id() -> None:
    plans = from_workload(generate("agentic", seed=1, max_requests=12))
    assert all(st.session_id == p.session_id for p in plans for st in p.steps)
    assert len({p.session_id for p in plans}) == len(plans)
