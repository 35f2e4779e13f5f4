"""The dispatcher over a real nats-server: the policy seam, load accounting, flights."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from kvrelay.router.errors import BadRequest, DeadlineExceeded, NoWorkersAvailable
from kvrelay.router.policy import RoundRobin, RouteRequest, RouteResult
from kvrelay.schemas.messages import SamplingSpec

if TYPE_CHECKING:
    from conftest import Cluster

IDS = list(range(10, 75))  # 65 prompt tokens


@dataclass
class Recording(RoundRobin):
    """Round robin that records what it was asked and told."""

    needs_hashes: bool = False
    requests: list[RouteRequest] = field(default_factory=list)
    results: list[RouteResult] = field(default_factory=list)

    def decide(self, request, workers):
        self.requests.append(request)
        return super().decide(request, workers)

    def update(self, result):
        self.results.append(result)


async def _run(router, rid: str, timeout_s: float = 30.0, ids=IDS) -> list:
    d = router.dispatcher
    flight = d.open(rid, "acme", timeout_s)
    try:
        await flight.dispatch(list(ids), SamplingSpec(max_tokens=3), d.bus.subjects.tokens(rid))
        chunks = [await flight.next_chunk()]
        while chunks[-1].finish_reason is None:
            chunks.append(await flight.next_chunk())
        return chunks
    finally:
        await flight.close()


@pytest.mark.parametrize("wants", [True, False])
async def test_dispatcher_hashes_the_prompt_only_for_a_policy_that_wants_them(cluster: Cluster, wants) -> None:
    calls = []

    def hasher(ids, tenant):
        calls.append((list(ids), tenant))
        return [len(ids) // 32] * (len(ids) // 32)

    policy = Recording(needs_hashes=wants)
    router = await cluster.router(policy=policy, hasher=hasher)
    await cluster.worker("p0")
    await cluster.seen(router, 1)
    chunks = await _run(router, "r1")
    assert [c.seq for c in chunks] == [0, 1, 2]
    (request,) = policy.requests
    assert (request.request_id, request.tenant, request.num_tokens) == ("r1", "acme", 65)
    if wants:
        assert calls == [(IDS, "acme")] and list(request.block_hashes) == [2, 2]
    else:
        assert calls == [] and request.block_hashes is None


async def test_dispatcher_tells_the_policy_dispatched_refused_and_prefill_done(cluster: Cluster) -> None:
    policy = Recording()
    router = await cluster.router(policy=policy)
    await cluster.worker("a", "reject")
    await cluster.worker("b")
    await cluster.seen(router, 2)
    await _run(router, "r1")
    assert [(r.worker_id, r.outcome) for r in policy.results] == [
        ("a", "dispatched"), ("a", "rejected"), ("b", "dispatched"), ("b", "finished")]
    assert policy.results[0].num_tokens == 65


async def test_dispatcher_counts_load_while_dispatched_and_frees_it_in_stages(cluster: Cluster) -> None:
    router = await cluster.router(policy=RoundRobin())
    worker = await cluster.worker("p0", "first_then_stall")
    await cluster.seen(router, 1)
    d = router.dispatcher
    flight = d.open("r1", "acme", 30)
    await flight.dispatch(list(IDS), SamplingSpec(max_tokens=3), d.bus.subjects.tokens("r1"))
    assert d.table.load("p0") == (1, 65)  # counted at dispatch, before any token
    await flight.next_chunk()
    assert d.table.load("p0") == (1, 0)  # prefill done: the prompt no longer queues there
    await flight.close()
    assert d.table.load("p0") == (0, 0) and "r1" not in d.flights
    await asyncio.wait_for(worker.cancelled.wait(), 10)


async def test_dispatcher_errors_for_no_workers_and_invalid_tasks(cluster: Cluster) -> None:
    router = await cluster.router()
    d = router.dispatcher
    flight = d.open("r0", "acme", 30)
    with pytest.raises(NoWorkersAvailable):
        await flight.dispatch(list(IDS), SamplingSpec(), d.bus.subjects.tokens("r0"))
    await flight.close()
    late = d.open("r_late", "acme", 0.001)
    late.deadline -= 1.0  # its deadline has passed too: no worker is still the reason given
    with pytest.raises(NoWorkersAvailable, match="no prefill worker"):
        await late.dispatch(list(IDS), SamplingSpec(), d.bus.subjects.tokens("r_late"))
    await late.close()
    await cluster.worker("strict", "invalid")
    await cluster.seen(router, 1)
    with pytest.raises(BadRequest, match="refused the request: prompt too long"):
        await _run(router, "r1")
    assert len(d.table) == 0 and not d.flights


async def test_dispatcher_deadline_before_dispatch_and_duplicate_ids(cluster: Cluster) -> None:
    router = await cluster.router()
    await cluster.worker("p0", "stall")
    await cluster.seen(router, 1)
    d = router.dispatcher
    flight = d.open("r1", "acme", 0.2)
    with pytest.raises(BadRequest, match="already in flight"):
        d.open("r1", "acme", 1)
    await flight.dispatch(list(IDS), SamplingSpec(), d.bus.subjects.tokens("r1"))
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await flight.next_chunk()
    await flight.close()
    assert len(d.table) == 0


async def test_dispatcher_kv_aware_routes_to_the_worker_holding_the_prefix(cluster: Cluster) -> None:
    from kvrelay.schemas.hashing import HashSpec, tenant_salt
    from kvrelay.schemas.kv_events import KvEvent, KvEventBatch

    router = await cluster.router(policy_name="kv_aware")
    assert router.policy.name == "kv_aware" and router.hasher is not None
    workers = [await cluster.worker("a"), await cluster.worker("b")]
    await cluster.seen(router, 2)
    prompt = [(7 * i) % 1000 + 3 for i in range(160)]  # 5 full blocks of 32
    spec = HashSpec(32)  # the engine's default block size and hash seed
    hashes = spec.hashes(prompt, tenant_salt("", "acme"))  # no secret: salted by the tenant's name
    bus = await cluster.bus()
    batch = KvEventBatch(worker_id="b", epoch=1, event_id=1, spec=spec.fingerprint,
                         events=[KvEvent.stored(hashes)])
    await bus.js_publish(bus.subjects.kv_events("b"), batch)
    await cluster.wait_until(lambda: router.index.match(hashes).get("b") == 5,
                             what="the index learned b's blocks", event=router.kv_events.applied)
    for i in range(3):  # every time: the cache hit beats an idle worker without it
        await _run(router, f"r{i}", ids=prompt)
    assert [len(w.tasks) for w in workers] == [0, 3]


def test_dispatcher_max_context_is_the_smallest_advertised_by_live_workers() -> None:
    from kvrelay.router.dispatcher import Dispatcher
    from kvrelay.schemas import WorkerInfo, pack
    from kvrelay.transport.config import BusConfig
    from kvrelay.transport.discovery import Directory

    class FakeBus:
        cfg = BusConfig()

    directory = Directory(FakeBus())  # type: ignore[arg-type]
    d = Dispatcher.__new__(Dispatcher)  # only the directory is used here
    d.directory = directory
    assert d.max_context(8192) == 8192
    assert d.max_context(None) is None
    for wid, role, n in (("p", "prefill", 2048), ("d", "decode", 4096), ("x", "decode", 0)):
        directory.apply(wid, pack(WorkerInfo(worker_id=wid, role=role, model="m", host="h", block_size=32,
                                               max_model_len=n)))
    assert d.max_context(8192) == 2048
    assert d.max_context(None) == 2048
