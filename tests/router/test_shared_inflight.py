"""Router replicas share dispatch-time load: pure RemoteLoads, then two routers on a real nats-server."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import pytest

from kvrelay.router.ledger import LoadLedger
from kvrelay.router.shared_inflight import InflightDelta, RemoteLoads, subject_token
from kvrelay.schemas.codec import unpack, pack
from kvrelay.schemas.errors import SchemaError
from kvrelay.schemas.messages import SamplingSpec, WorkerInfo

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _d(kind: str, rid: str = "r1", worker: str = "w1", tokens: int = 0, router: str = "A",
       ttl_ms: int = 10_000) -> InflightDelta:
    return InflightDelta(router_id=router, request_id=rid, kind=kind, worker_id=worker, tokens=tokens,
                         ttl_ms=ttl_ms)


def test_remote_loads_follow_dispatch_prefill_done_and_release() -> None:
    r = RemoteLoads(clock=Clock())
    r.apply(_d("dispatched", tokens=500))
    r.apply(_d("dispatched", rid="r2", tokens=100))
    assert r.load("w1") == (2, 600)
    r.apply(_d("prefill_done"))
    assert r.load("w1") == (2, 100)
    r.apply(_d("released"))
    r.apply(_d("released"))  # twice: idempotent
    assert r.load("w1") == (1, 100)
    r.apply(_d("dispatched", rid="r2", worker="w2", tokens=100))  # moved (refused by w1)
    assert r.load("w1") == (0, 0) and r.load("w2") == (1, 100)


def test_remote_loads_expire_when_a_router_dies_silently() -> None:
    clock = Clock()
    r = RemoteLoads(clock=clock, max_ttl_s=60.0)
    r.apply(_d("dispatched", tokens=500, ttl_ms=5_000))
    clock.now += 4.9
    assert r.expire() == 0 and r.load("w1") == (1, 500)
    clock.now += 0.2
    assert r.expire() == 1 and r.load("w1") == (0, 0) and len(r) == 0


def test_remote_loads_ttl_is_capped() -> None:
    clock = Clock()
    r = RemoteLoads(clock=clock, max_ttl_s=1.0)
    r.apply(_d("dispatched", tokens=5, ttl_ms=86_400_000))
    clock.now += 1.5
    assert r.expire() == 1


def test_remote_loads_full_table_evicts_oldest() -> None:
    r = RemoteLoads(max_entries=2, clock=Clock())
    for i in range(3):
        r.apply(_d("dispatched", rid=f"r{i}", tokens=10))
    assert len(r) == 2 and r.load("w1") == (2, 20) and r.counters["evicted"] == 1


def test_remote_loads_forget_router() -> None:
    r = RemoteLoads(clock=Clock())
    r.apply(_d("dispatched", router="A", tokens=10))
    r.apply(_d("dispatched", router="B", tokens=20))
    r.forget_router("A")
    assert r.load("w1") == (1, 20)


def test_inflight_delta_rejects_bad_kind_and_roundtrips() -> None:
    d = _d("dispatched", tokens=3)
    assert unpack(pack(d), InflightDelta) == d
    with pytest.raises(SchemaError):
        InflightDelta.from_mapping({"router_id": "A", "request_id": "r", "kind": "exploded"})


def test_inflight_table_tells_listener_and_adds_remote_load() -> None:
    heard = []
    t = LoadLedger(8)
    t.listener = lambda *a: heard.append(a)
    t.remote = RemoteLoads(clock=Clock())
    t.remote.apply(_d("dispatched", rid="x", worker="w1", tokens=300))
    t.admit("r1")
    t.assign("r1", "w1", 50)
    t.prefill_done("r1")
    t.release("r1")
    assert heard == [("dispatched", "r1", "w1", 50), ("prefill_done", "r1", "w1", 0),
                     ("released", "r1", "w1", 0)]
    (view,) = t.views([WorkerInfo(worker_id="w1", role="prefill", model="m", host="h", block_size=32)])
    assert (view.inflight, view.inflight_tokens) == (1, 300)


def test_subject_token_makes_host_names_valid() -> None:
    assert subject_token("router-ip-10.0.0.1-77") == "router-ip-10_0_0_1-77"


# --- two routers, a real nats-server, fake workers ------------------------------------------------------
async def _dispatch(router, rid: str, n_tokens: int):
    """Dispatch a request through ``router``; returns (worker, its flight, to close)."""
    d = router.dispatcher
    flight = d.open(rid, "acme", 30.0)
    return await flight.dispatch(list(range(10, 10 + n_tokens)), SamplingSpec(max_tokens=2),
                                 d.bus.subjects.tokens(rid)), flight


async def _two_routers(cluster: Cluster, share: bool):
    a = await cluster.router(router_id="ra", share_inflight=share)
    b = await cluster.router(router_id="rb", share_inflight=share)
    workers = [await cluster.worker(w, mode="hold") for w in ("w1", "w2")]
    for r in (a, b):
        await cluster.seen(r, 2)
    return a, b, workers


async def _synced(cluster: Cluster, router, worker_id: str, inflight: int) -> None:
    """Wait until ``router`` counts ``inflight`` requests from the other router on ``worker_id``."""
    shared = router.shared_inflight
    await cluster.wait_until(lambda: shared.remote.load(worker_id)[0] == inflight,
                             what=f"{inflight} remote requests on {worker_id}", event=shared.applied)


async def test_shared_inflight_second_router_avoids_the_worker_the_first_loaded(cluster: Cluster) -> None:
    a, b, workers = await _two_routers(cluster, share=True)
    big, fa = await _dispatch(a, "big", 2000)  # 2000 prompt tokens queued on one worker
    await _synced(cluster, b, big, 1)
    other = "w2" if big == "w1" else "w1"
    picks, flights = [], [fa]
    for i in range(4):  # 4 x 100 tokens < 2000: every one belongs on the other worker
        wid, f = await _dispatch(b, f"small{i}", 100)
        picks.append(wid)
        flights.append(f)
    assert picks == [other] * 4
    for w in workers:
        w.release.set()
    for f in flights:
        await f.close()
    await _synced(cluster, b, big, 0)  # released: the load is gone on the other router too


async def test_shared_inflight_alternating_routers_spread_evenly(cluster: Cluster) -> None:
    a, b, workers = await _two_routers(cluster, share=True)
    picks: Counter[str] = Counter()
    sent: Counter[tuple[str, str]] = Counter()  # (router, worker) -> requests
    flights = []
    for i in range(8):
        router, peer = (a, b) if i % 2 == 0 else (b, a)
        wid, f = await _dispatch(router, f"r{i}", 200)
        picks[wid] += 1
        sent[router.id, wid] += 1
        flights.append(f)
        await _synced(cluster, peer, wid, sent[router.id, wid])
    assert picks == Counter({"w1": 4, "w2": 4})
    for w in workers:
        w.release.set()
    for f in flights:
        await f.close()


async def test_shared_inflight_off_second_router_is_blind(cluster: Cluster) -> None:
    """The control: without sharing, the second router spreads its requests over both workers."""
    a, b, workers = await _two_routers(cluster, share=False)
    assert a.shared_inflight is None and b.shared_inflight is None
    big, fa = await _dispatch(a, "big", 2000)
    picks, flights = [], [fa]
    for i in range(4):
        wid, f = await _dispatch(b, f"small{i}", 100)
        picks.append(wid)
        flights.append(f)
    assert Counter(picks) == Counter({"w1": 2, "w2": 2})
    for w in workers:
        w.release.set()
    for f in flights:
        await f.close()
