"""Real vLLM engines publish KV events with kvrelay's hashes: the router's index, fed from a real
nats-server, holds exactly the full-block hashes the router's own hasher computes."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import pytest_asyncio

from kvrelay import models
from kvrelay.config import Config
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.router.index_feed import KvEventsSubscriber
from kvrelay.router.policy_factory import kv_routing
from kvrelay.schemas.messages import PrefillDone, PrefillTask, SamplingSpec
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.workers.config import DecodeConfig, EngineConfig, PrefillConfig
from kvrelay.workers.vllm_engine.engine import VllmDecodeEngine, VllmPrefillEngine

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

SECRET = "router-secret"
WAIT_S = 30.0


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40_000) for _ in range(n)]


@pytest.fixture(scope="module")
def engine_cfg() -> EngineConfig:
    return EngineConfig(model=str(models.resolve("tiny")), dtype="float32", max_model_len=1024,
                        kv_cache_gb=0.25, max_num_seqs=4)


@pytest.fixture(scope="module")
def cfg(engine_cfg: EngineConfig) -> Config:
    return Config(engine=engine_cfg, cache=CacheConfig(tenant_salt_secret=SECRET))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployed(nats_server, engine_cfg: EngineConfig, cfg: Config):
    bus_cfg = BusConfig(url=nats_server.url, namespace=f"kvev{time.monotonic_ns()}",
                        kv_events=StreamLimits(max_msgs=10_000, max_bytes=8 << 20, max_age_s=300.0,
                                               discard="old", storage="memory"))
    bus = await Bus.connect(bus_cfg, "test-vllm-kv-events")
    prefill = VllmPrefillEngine(engine_cfg, PrefillConfig(export_mb=32, lease_s=30.0), cfg.cache)
    decode = VllmDecodeEngine(engine_cfg, DecodeConfig(transfer_timeout_s=10.0), cfg.cache)
    for engine, wid in ((prefill, "p0"), (decode, "d0")):
        engine.attach_bus(bus, wid)
    _, hasher, index = kv_routing(cfg.router, cfg.cache)
    sub = KvEventsSubscriber(bus, index, "r0")
    try:
        await prefill.start()
        await decode.start()
        await sub.start()
        yield prefill, decode, hasher, index
    finally:
        await sub.close()
        await decode.stop()
        await prefill.stop()
        await bus.close()


async def _until(cond, what: str) -> None:
    async def loop() -> None:
        while not cond():
            await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(loop(), WAIT_S)
    except asyncio.TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def _held(index, worker_id: str) -> list[int]:
    return sorted(index.snapshot(worker_id)) if worker_id in index.workers() else []


def _task(prompt: list[int], tenant: str, max_tokens: int = 8) -> PrefillTask:
    return PrefillTask(request_id=f"r-{time.monotonic_ns()}", tenant=tenant, prompt_token_ids=prompt,
                       sampling=SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                       stream_subject="s", deadline_ms=0)


async def test_vllm_kv_events_index_holds_request_full_block_hashes(deployed) -> None:
    prefill, decode, hasher, index = deployed
    prompt = _prompt(1, 3 * 32 + 7)  # 3 full blocks
    task = _task(prompt, "acme")
    out = await prefill.prefill(task)
    want = hasher(prompt, "acme")
    assert len(want) == 3
    await _until(lambda: _held(index, "p0") == sorted(want), "the prefill worker's blocks")
    assert index.match(want).get("p0") == 3
    assert not index.match(hasher(prompt, "other")), "another tenant must not match these blocks"

    done = PrefillDone(request_id=task.request_id, tenant="acme", prompt_token_ids=prompt,
                       first_token_id=out.first_token_id, sampling=task.sampling, stream_subject="s",
                       deadline_ms=0, prefill_worker="p0", kv=out.kv)
    deltas = [d async for d in decode.stream(done)]
    assert deltas[-1].finish_reason == "length"
    await _until(lambda: index.match(want).get("d0") == 3, "the decode worker's blocks")
    if out.kv is not None:
        prefill.release(out.kv.ticket)


async def test_vllm_kv_events_tenants_hold_separate_blocks(deployed) -> None:
    prefill, _, hasher, index = deployed
    prompt = _prompt(2, 2 * 32)
    for tenant in ("a", "b"):
        out = await prefill.prefill(_task(prompt, tenant))
        if out.kv is not None:
            prefill.release(out.kv.ticket)
    for tenant in ("a", "b"):
        want = hasher(prompt, tenant)
        await _until(lambda: index.match(want).get("p0") == 2, f"tenant {tenant}'s blocks")
    assert not set(hasher(prompt, "a")) & set(hasher(prompt, "b"))
