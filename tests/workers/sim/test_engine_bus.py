"""The simulated engines on a real nats-server: KV events into a router's prefix index, and the
worker services serving a request end to end with simulated engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from workers_harness import Collector, Service, config, eventually, task, worker_record

from kvrelay.router.index_feed import KvEventsSubscriber
from kvrelay.router.index import PrefixIndex
from kvrelay.schemas.messages import DispatchReply, TokenChunk
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.workers import decode as decode_worker
from kvrelay.workers import prefill as prefill_worker
from kvrelay.workers.config import DecodeConfig, EngineConfig, PrefillConfig
from kvrelay.workers.sim import SimDecodeEngine, SimPrefillEngine, sim_tokens

pytestmark = pytest.mark.timeout(60)


def engine_cfg(**kw) -> EngineConfig:
    return EngineConfig(kind="sim", sim_time_scale=0.0, **kw)


@pytest.fixture
def kv_config(bus_config: BusConfig) -> BusConfig:
    """Small, memory-backed event streams: many tests share one server's JetStream budget."""
    return bus_config.replace(kv_events=StreamLimits(max_msgs=1000, max_bytes=1 << 20, max_age_s=60.0,
                                                     discard="old", storage="memory"))


@pytest.fixture
async def bus(kv_config: BusConfig) -> AsyncIterator[Bus]:
    b = await Bus.connect(kv_config, "test-client")
    await b.ensure_prefilled_stream()
    yield b
    await b.close()


async def until_index(sub: KvEventsSubscriber, pred, timeout: float = 10.0) -> None:
    async def loop() -> None:
        while not pred():
            sub.applied.clear()
            await sub.applied.wait()

    await asyncio.wait_for(loop(), timeout)


async def test_sim_prefill_kv_events_keep_a_router_index_exact(bus: Bus) -> None:
    engine = SimPrefillEngine(engine_cfg(sim_num_blocks=8), PrefillConfig(), worker_id="p1")
    engine.attach_bus(bus, "p1")
    index = PrefixIndex(engine.spec.fingerprint)
    sub = KvEventsSubscriber(bus, index, "router-1")
    await engine.start()
    await sub.start()
    try:
        a, b = list(range(100)), list(range(5000, 5200))
        ha, hb = engine.hashes(a, "t"), engine.hashes(b, "t")
        await engine.prefill(task("a", a, max_tokens=1))
        await until_index(sub, lambda: index.match(ha) == {"p1": 3})
        await engine.prefill(task("b", b, max_tokens=1))  # 7 blocks of 8: evicts a's two deepest
        await until_index(sub, lambda: index.match(hb) == {"p1": 6})
        assert index.match(ha) == {"p1": engine.blocks.cached_blocks(ha)} == {"p1": 1}
        assert engine.blocks.counters["evicted_blocks"] == 2
    finally:
        await sub.close()
        await engine.stop()


async def test_sim_engines_serve_a_request_through_the_worker_services(bus: Bus, kv_config: BusConfig,
                                                                       namespace: str) -> None:
    cfg = config(kv_config)
    pengine = SimPrefillEngine(engine_cfg(), cfg.prefill, worker_id="p1")
    dengine = SimDecodeEngine(engine_cfg(), DecodeConfig(), worker_id="d1")
    prefill = Service(prefill_worker.serve, cfg, pengine)
    decode = Service(decode_worker.serve, cfg, dengine)
    try:
        await worker_record(bus, "p1")
        await worker_record(bus, "d1")
        prompt = list(range(300, 380))
        t = task("r1", prompt, max_tokens=8, ns=namespace)
        chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
        assert (await bus.request(bus.subjects.prefill("p1"), t, DispatchReply)).accepted
        out = await chunks.until_final()
        assert [tok for c in out for tok in c.token_ids] == sim_tokens(prompt, 8)
        assert out[-1].finish_reason == "length" and out[-1].usage.completion_tokens == 8
        assert dengine.stats().extra["imported"] == 1 and dengine.stats().extra["recomputed"] == 0

        async def lease_released() -> bool:
            return pengine.stats().exported_blocks == 0

        await eventually(lease_released)  # the decode worker's LeaseRelease reached the prefill worker
    finally:
        await decode.close()
        await prefill.close()
