"""Decode affinity end to end: a kv_aware router, simulated prefill and decode workers (real
block managers, real KV events, real shared-memory KV), a real nats-server, one salt secret.

An agent's step 2 (step 1's prompt + its output + a tool result) goes to the decode worker that
ran step 1 and is prefilled there: no prefill task, no lease, no transfer; the tokens are the
ones the normal path gives. When that decode worker is full, step 2 takes the normal path.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from kvrelay.config import Config
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.schemas.messages import Cancel, DispatchReply, PrefillTask, SamplingSpec
from kvrelay.workers import decode as decode_worker
from kvrelay.workers import prefill as prefill_worker
from kvrelay.workers.factory import decode_engine, prefill_engine
from kvrelay.workers.sim import sim_tokens

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.timeout(120)

MODEL = "kvrelay-tiny"
SECRET = "s3cret-salt"
STEP1 = [(i * 29) % 800 + 3 for i in range(96)]  # 3 full blocks of 32
TOOL = [41, 42, 43, 44, 45, 46, 47, 48]
N_OUT = 8


class Workers:
    """Simulated workers run by their real services (``serve``); stopped at teardown."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.engines: dict[str, Any] = {}
        self._stops: list[tuple[asyncio.Event, asyncio.Task]] = []

    def config(self, time_scale: float, **decode: Any) -> Config:
        return Config.from_mapping({
            "bus": self.cluster.bus_config.to_mapping(),
            "cache": {"tenant_salt_secret": SECRET, "block_size": 32},
            "engine": {"kind": "sim", "sim_time_scale": time_scale, "sim_num_blocks": 1024},
            "prefill": {"lease_check_s": 0.05, "drain_timeout_s": 0.5},
            "decode": {"fetch_timeout_s": 0.2, "drain_timeout_s": 0.5, **decode},
        })

    def start(self, role: str, wid: str, time_scale: float = 0.0, **decode: Any) -> Any:
        cfg = self.config(time_scale, **decode)
        engine = prefill_engine(cfg, wid) if role == "prefill" else decode_engine(cfg, wid)
        cfg = cfg.replace(prefill=cfg.prefill.replace(worker_id=wid),
                          decode=cfg.decode.replace(worker_id=wid))
        serve = prefill_worker.serve if role == "prefill" else decode_worker.serve
        stop = asyncio.Event()
        self._stops.append((stop, asyncio.create_task(serve(cfg, stop, engine), name=f"{role}-{wid}")))
        self.engines[wid] = engine
        return engine

    async def close(self) -> None:
        for stop, _ in self._stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*(t for _, t in self._stops), return_exceptions=True), 30)


@pytest.fixture
async def workers(cluster: Cluster):
    w = Workers(cluster)
    yield w
    await w.close()


async def _complete(url: str, prompt: list[int], session: str) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": N_OUT, "temperature": 0, "session_id": session}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", data=json.dumps(body)) as r:
        out = await r.json(content_type=None)
        assert r.status == 200, out
        return out


def _text(prompt: list[int]) -> str:
    return "".join(f" t{t}" for t in sim_tokens(prompt, N_OUT))


def _sample(router, name: str, **labels: str) -> float:
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


async def _router(cluster: Cluster):
    return await cluster.router(policy_name="kv_aware", kv_local_threshold_tokens=64,
                                cache=CacheConfig(tenant_salt_secret=SECRET))


async def test_local_prefill_agent_step_2_runs_on_step_1s_decode_worker(cluster: Cluster, workers) -> None:
    router = await _router(cluster)
    p1 = workers.start("prefill", "p1")
    decs = {w: workers.start("decode", w) for w in ("d1", "d2")}
    await cluster.seen(router, 1, 2)
    one = await _complete(router.url, STEP1, "agent-7")
    assert one["choices"][0]["text"] == _text(STEP1)
    rec = router.dispatcher.local.sessions.get("default", "agent-7")
    assert rec is not None and rec.worker in decs
    home, other = decs[rec.worker], decs[({"d1", "d2"} - {rec.worker}).pop()]
    assert home.counters["imported"] == 1
    # workers and router salt with the same secret: the index (fed by the workers' KV events) names
    # step 1's blocks on p1 and on the decode worker; another tenant's hashes match nothing
    hashes = router.hasher(STEP1, "default")
    await cluster.wait_until(lambda: router.index.match(hashes) == {"p1": 3, rec.worker: 3},
                             what="step 1's blocks indexed on p1 and its decode worker")
    assert router.index.match(router.hasher(STEP1, "other")) == {}
    step2 = STEP1 + sim_tokens(STEP1, N_OUT) + TOOL  # 112 tokens: 16 not in the 3 blocks it holds
    two = await _complete(router.url, step2, "agent-7")
    assert two["choices"][0]["text"] == _text(step2)  # what prefill + transfer + decode gives
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert _sample(router, "kvrelay_router_local_prefill_total", reason="decode_affinity",
                   outcome="accepted") == 1
    assert home.counters["local_prefills"] == 1 and home.counters["local_computed_tokens"] == 16
    assert home.counters["imported"] == 1  # nothing transferred for step 2
    assert p1._next_ticket == 2  # one export (step 1's) ever leased by the prefill worker
    assert other.counters["local_prefills"] == 0
    # step 3 follows the record step 2 left (it finished on the same decode worker)
    step3 = step2 + sim_tokens(step2, N_OUT) + TOOL
    three = await _complete(router.url, step3, "agent-7")
    assert three["choices"][0]["text"] == _text(step3)
    assert home.counters["local_prefills"] == 2 and p1._next_ticket == 2


async def test_local_prefill_full_decode_worker_falls_back_to_the_prefill_path(cluster: Cluster,
                                                                               workers) -> None:
    router = await _router(cluster)
    p1 = workers.start("prefill", "p1")
    d1 = workers.start("decode", "d1", time_scale=1.0, max_slots=1)  # real-time decoding, one slot
    await cluster.seen(router, 1, 1)
    await _complete(router.url, STEP1, "agent-9")
    assert router.dispatcher.local.sessions.get("default", "agent-9").worker == "d1"
    # something else holds d1's only slot (a local request of 3000 tokens: minutes of decoding)
    bus = await cluster.bus()
    holder = PrefillTask(request_id="holder", tenant="default", prompt_token_ids=[5, 6, 7], deadline_ms=0,
                         sampling=SamplingSpec(max_tokens=3000), stream_subject=bus.subjects.tokens("holder"))
    assert (await bus.request(bus.subjects.local_prefill("d1"), holder, DispatchReply)).accepted
    step2 = STEP1 + sim_tokens(STEP1, N_OUT) + TOOL
    pending = asyncio.create_task(_complete(router.url, step2, "agent-9"))
    try:
        # d1 refuses (or its heartbeat already shows it full): step 2 is prefilled by p1 ...
        await cluster.wait_until(lambda: p1._next_ticket == 3, what="step 2 prefilled by p1")
        refused = _sample(router, "kvrelay_router_local_prefill_total", reason="decode_affinity",
                          outcome="overloaded")
        busy = _sample(router, "kvrelay_router_session_lookups_total", result="worker_busy")
        assert refused + busy == 1
        assert not pending.done()  # ... and waits in the work queue for a decode slot
        await bus.publish(bus.subjects.cancel("default", "holder"), Cancel(request_id="holder"))
        two = await asyncio.wait_for(pending, 60)
    finally:
        pending.cancel()
    assert two["choices"][0]["text"] == _text(step2)
    assert d1.counters["local_prefills"] == 1  # the holder only
