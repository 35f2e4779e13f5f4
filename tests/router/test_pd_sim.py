"""Short prompts keep flowing while a long prompt is prefilled: a kv_aware router, simulated workers
(real services, real block managers, real shared-memory KV), a real nats-server.

- the adaptive P/D decider: with the prefill worker busy with a long prompt, a short prompt without
  a session is prefilled on the idle decode worker; with the prefill worker idle it goes there;
- the prefill worker's chunked turns (``prefill.long_prompt_step_tokens``): with local prefill off,
  a short prompt sent while a long one computes gets its answer first.

Modelled time runs at a fraction of real time: the long prompt takes seconds, a short one a tenth
of a second; the tests wait on the router's state (the long prompt counted on its prefill worker),
never on the clock.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from kvrelay.config import Config
from kvrelay.workers import decode as decode_worker
from kvrelay.workers import prefill as prefill_worker
from kvrelay.workers.factory import decode_engine, prefill_engine
from kvrelay.workers.sim import sim_tokens

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.timeout(120)

MODEL = "kvrelay-tiny"
LONG = [(i * 31) % 900 + 3 for i in range(3000)]  # 8.6 modelled seconds of prefill, 2.6 s real
TIME_SCALE = 0.3


def _short(i: int) -> list[int]:
    return [(i * 97 + j * 13) % 900 + 3 for j in range(64)]


class SimWorkers:
    """Simulated workers run by their real services (``serve``); stopped at teardown."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.engines: dict[str, Any] = {}
        self._stops: list[tuple[asyncio.Event, asyncio.Task]] = []

    def start(self, role: str, wid: str, prefill: dict | None = None) -> Any:
        cfg = Config.from_mapping({
            "bus": self.cluster.bus_config.to_mapping(), "cache": {"block_size": 32},
            "engine": {"kind": "sim", "sim_time_scale": TIME_SCALE, "sim_num_blocks": 2048},
            "prefill": {"lease_check_s": 0.05, "drain_timeout_s": 0.5, "export_mb": 512, **(prefill or {})},
            "decode": {"fetch_timeout_s": 0.2, "drain_timeout_s": 0.5},
        })
        engine = prefill_engine(cfg, wid) if role == "prefill" else decode_engine(cfg, wid)
        cfg = cfg.replace(prefill=cfg.prefill.replace(worker_id=wid), decode=cfg.decode.replace(worker_id=wid))
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
async def sims(cluster: Cluster):
    w = SimWorkers(cluster)
    yield w
    await w.close()


async def _complete(url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", data=json.dumps(body)) as r:
        out = await r.json(content_type=None)
        assert r.status == 200, out
        return out


def _text(prompt: list[int], n: int) -> str:
    return "".join(f" t{t}" for t in sim_tokens(prompt, n))


def _sample(router, name: str, **labels: str) -> float:
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


async def _long_on(cluster: Cluster, router, worker: str) -> asyncio.Task:
    """Send the long prompt; return once the router counts it as prefill work on ``worker``."""
    long = asyncio.create_task(_complete(router.url, LONG, 2))
    await cluster.wait_until(lambda: router.dispatcher.table.pending_tokens(worker) >= len(LONG) or long.done(),
                             what="the long prompt dispatched")
    assert not long.done()
    return long


async def test_pd_adaptive_short_prompts_prefill_on_the_decode_worker_while_a_long_one_is_prefilled(
        cluster: Cluster, sims) -> None:
    # a decode worker's prompt token is made to weigh 4 of a prefill worker's, so for a 64-token prompt
    # an idle prefill worker wins (64 + 128 hop + 1 transfer = 193 against 4 * 64 = 256) and one busy
    # with the long prompt loses (3000 + 193 against 256)
    router = await cluster.router(policy_name="kv_aware", pd_local_token_cost=4.0)
    sims.start("prefill", "p1")
    d1 = sims.start("decode", "d1")
    await cluster.seen(router, 1, 1)
    idle = await _complete(router.url, _short(0), 4)
    assert idle["choices"][0]["text"] == _text(_short(0), 4)
    assert _sample(router, "kvrelay_router_pd_decisions_total", choice="remote", reason="cheaper_remote") == 1
    assert d1.counters["local_prefills"] == 0 and d1.counters["imported"] == 1
    long = await _long_on(cluster, router, "p1")
    try:
        for i in range(1, 4):  # each gets its answer while the long prompt is still being prefilled
            out = await _complete(router.url, _short(i), 4)
            assert out["choices"][0]["text"] == _text(_short(i), 4)  # what the prefill path gives
            assert not long.done()
        assert _sample(router, "kvrelay_router_pd_decisions_total", choice="local", reason="cheaper_local") == 3
        assert _sample(router, "kvrelay_router_local_prefill_total", reason="prefill_load", outcome="accepted") == 3
        assert d1.counters["local_prefills"] == 3
        done = await asyncio.wait_for(long, 60)
    finally:
        long.cancel()
    assert done["choices"][0]["text"] == _text(LONG, 2)


async def test_pd_prefill_worker_chunked_turns_answer_a_short_prompt_before_a_long_one(cluster: Cluster,
                                                                                      sims) -> None:
    router = await cluster.router(policy_name="kv_aware", kv_local_prefill=False)
    sims.start("prefill", "p1", {"long_prompt_step_tokens": 128})
    sims.start("decode", "d1")
    await cluster.seen(router, 1, 1)
    long = await _long_on(cluster, router, "p1")
    try:
        out = await _complete(router.url, _short(1), 4)
        assert out["choices"][0]["text"] == _text(_short(1), 4)
        assert not long.done()  # the short prompt was computed between the long one's chunks
        done = await asyncio.wait_for(long, 60)
    finally:
        long.cancel()
    assert done["choices"][0]["text"] == _text(LONG, 2)
