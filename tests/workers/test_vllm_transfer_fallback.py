"""The real prefill and decode services on a real nats-server with real vLLM engines (tiny model):
the KV crosses through the tcp block server, and a transfer that fails (lease released early, a
corrupted byte under an integrity checksum) still completes the request through the recompute
fallback, with the same greedy tokens.

The engines start once for the module; each test runs the services around them. Both engines'
prefix caches are emptied before each test, so every request really transfers or recomputes, and
every prefill computes the whole prompt (a prefix-cache hit computes in other chunks, and with the
tiny random-weight model that can flip a near-tied greedy token).
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from workers_harness import Collector, config, eventually, stream_count, task

from kvrelay import models
from kvrelay.schemas.messages import DispatchReply, LeaseRelease, SamplingSpec, TokenChunk
from kvrelay.transport.bus import Bus
from kvrelay.workers.config import DecodeConfig, EngineConfig, PrefillConfig
from kvrelay.workers.decode import DecodeService
from kvrelay.workers.prefill import PrefillService
from kvrelay.workers.vllm_engine.engine import VllmDecodeEngine, VllmPrefillEngine

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

MAX_TOKENS = 8
PROMPT = [random.Random(11).randrange(100, 40_000) for _ in range(170)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines():
    ec = EngineConfig(
        model=str(models.resolve("tiny")), dtype="float32", max_model_len=1024, kv_cache_gb=0.25
    )
    prefill = VllmPrefillEngine(
        ec, PrefillConfig(worker_id="p1", export_mb=32, lease_s=60.0, checksum=True, backends=["shm", "tcp"])
    )
    decode = VllmDecodeEngine(
        ec, DecodeConfig(worker_id="d1", backends=["tcp", "shm"], transfer_timeout_s=20.0)
    )
    try:
        await prefill.start()
        await decode.start()
        yield prefill, decode
    finally:
        await decode.stop()
        await prefill.stop()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def no_blocks_held(engine, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await engine.reset_prefix_cache():
        assert time.monotonic() < deadline, "vLLM still holds KV blocks"
        await asyncio.sleep(0.05)


class Services:
    """Prefill and decode services around the module's engines, on this test's bus."""

    def __init__(self, bus_config, engines) -> None:
        self.cfg = config(bus_config, prefill={"checksum": True}, decode={"backends": ["tcp", "shm"]})
        self.pengine, self.dengine = engines
        self.bus: Bus | None = None
        self.prefill: PrefillService | None = None
        self.decode: DecodeService | None = None

    async def __aenter__(self) -> Services:
        self.bus = await Bus.connect(self.cfg.bus, "test")
        await self.bus.ensure_prefilled_stream()
        self.prefill = PrefillService(self.cfg, self.pengine, self.bus, "p1")
        await self.prefill.start()
        return self

    async def start_decode(self) -> None:
        self.decode = DecodeService(self.cfg, self.dengine, self.bus, "d1")
        await self.decode.start()

    async def request(self, rid: str, ns: str) -> tuple[Collector, str]:
        t = task(rid, PROMPT, max_tokens=MAX_TOKENS, ns=ns)
        t = t.replace(sampling=SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))  # greedy
        chunks = await Collector.open(self.bus, t.stream_subject, TokenChunk)
        assert (await self.bus.request(self.bus.subjects.prefill("p1"), t, DispatchReply)).accepted
        return chunks, rid

    async def __aexit__(self, *exc) -> None:
        if self.decode is not None:
            await self.decode.shutdown()
        await self.prefill.shutdown()
        await self.bus.close()


def tokens_of(chunks: list[TokenChunk]) -> list[int]:
    assert chunks[-1].finish_reason == "length" and chunks[-1].error is None, chunks[-1]
    return [t for c in chunks for t in c.token_ids]


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    return {}


async def test_transfer_service_moves_kv_over_tcp(engines, bus_config, namespace, reference) -> None:
    prefill, decode = engines
    await no_blocks_held(decode)
    await no_blocks_held(prefill)
    tcp0 = metric("kvrelay_kv_transfer_backend_total", backend="tcp")
    async with Services(bus_config, engines) as s:
        await s.start_decode()
        chunks, _ = await s.request("tcp-1", namespace)
        reference["tokens"] = tokens_of(await chunks.until_final(timeout=120))
        await eventually(lambda: _async(s.pengine.stats().exported_blocks == 0), timeout=10)  # released
    assert len(reference["tokens"]) == MAX_TOKENS
    assert metric("kvrelay_kv_transfer_backend_total", backend="tcp") == tcp0 + 1
    assert decode.counters.get("imports_tcp", 0) >= 1


async def _async(value: bool) -> bool:
    return value


async def _fails_then_recomputes(engines, bus_config, namespace, reference, spoil, code: str) -> None:
    prefill, decode = engines
    assert reference, "needs the tcp test's tokens"
    await no_blocks_held(decode)
    await no_blocks_held(prefill)
    failed0 = metric("kvrelay_kv_transfer_failures_total", code=code)
    recomputed0 = metric("kvrelay_decode_kv_recomputed_total")
    async with Services(bus_config, engines) as s:
        chunks, rid = await s.request(f"{code}-1", namespace)
        first = await chunks.next(timeout=120)  # the prefill worker's token: the KV is exported
        await eventually(lambda: _async_count(s.bus), timeout=10)  # PrefillDone waits on the work queue
        await spoil(s)
        await s.start_decode()
        rest = await chunks.until_final(timeout=120)
        assert tokens_of([first, *rest]) == reference["tokens"]  # same greedy tokens, KV recomputed
    assert metric("kvrelay_kv_transfer_failures_total", code=code) == failed0 + 1
    assert metric("kvrelay_decode_kv_recomputed_total") == recomputed0 + 1


async def _async_count(bus: Bus) -> bool:
    return await stream_count(bus) == 1


async def test_transfer_lease_released_early_falls_back_to_recompute(
    engines, bus_config, namespace, reference
) -> None:
    async def release_early(s: Services) -> None:
        ticket = next(iter(s.pengine._leases._leases))  # the one export held
        await s.bus.publish(
            s.bus.subjects.kv_release("p1"), LeaseRelease(request_id="x", ticket=ticket, reason="test")
        )
        await eventually(lambda: _async(s.pengine.stats().exported_blocks == 0), timeout=10)

    await _fails_then_recomputes(engines, bus_config, namespace, reference, release_early, "lease_expired")


async def test_transfer_corrupted_byte_is_caught_and_recomputed(
    engines, bus_config, namespace, reference
) -> None:
    async def flip_a_byte(s: Services) -> None:
        block = next(iter(s.pengine._leases._leases.values())).blocks[1]
        s.pengine._region.data[block, 0, 5] += 1.0  # after the export's checksum was taken

    await _fails_then_recomputes(engines, bus_config, namespace, reference, flip_a_byte, "checksum_mismatch")
    prefill, _ = engines
    await eventually(lambda: _async(prefill.stats().exported_blocks == 0), timeout=10)  # released after all
