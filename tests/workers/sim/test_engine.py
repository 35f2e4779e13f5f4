"""The simulated engines through the engine Protocols: prefill -> descriptor -> decode, leases, aborts.

``sim_time_scale=0`` makes modelled time free; tests that need a request in flight use the real
scale and abort it (waiting on the engine's state, never on the clock).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator

import pytest

from kvrelay.schemas.codec import pack
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.schemas.messages import PrefillDone, PrefillTask, SamplingSpec
from kvrelay.workers.config import DecodeConfig, EngineConfig, PrefillConfig
from kvrelay.workers.engine import DecodeEngine, PrefillEngine, TokenDelta
from kvrelay.workers.errors import ExportFull
from kvrelay.workers.sim import SimDecodeEngine, SimPrefillEngine, UnknownPreset, sim_tokens

pytestmark = pytest.mark.timeout(60)
PROMPT = list(range(1000, 1100))  # 100 tokens: 3 full blocks of 32 and a partial one


def engine_cfg(scale: float = 0.0, **kw) -> EngineConfig:
    return EngineConfig(kind="sim", sim_time_scale=scale, **kw)


def make_task(rid: str, prompt: list[int] = PROMPT, max_tokens: int = 6, tenant: str = "t") -> PrefillTask:
    return PrefillTask(request_id=rid, tenant=tenant, prompt_token_ids=prompt,
                       sampling=SamplingSpec(max_tokens=max_tokens), stream_subject=f"s.{rid}",
                       deadline_ms=int((time.time() + 30) * 1000))


def done_for(task: PrefillTask, out) -> PrefillDone:
    return PrefillDone(request_id=task.request_id, tenant=task.tenant, prompt_token_ids=task.prompt_token_ids,
                       first_token_id=out.first_token_id, sampling=task.sampling,
                       stream_subject=task.stream_subject, deadline_ms=task.deadline_ms, prefill_worker="p",
                       kv=out.kv, cached_tokens=out.cached_tokens)


async def collect(engine: DecodeEngine, done: PrefillDone) -> list[TokenDelta]:
    return [d async for d in engine.stream(done)]


@pytest.fixture
async def engines() -> AsyncIterator[tuple[SimPrefillEngine, SimDecodeEngine]]:
    p = SimPrefillEngine(engine_cfg(), PrefillConfig(export_mb=64))
    d = SimDecodeEngine(engine_cfg(), DecodeConfig())
    await p.start()
    await d.start()
    yield p, d
    await d.stop()
    await p.stop()


async def until(pred, limit: int = 10_000) -> None:
    """Yield to the loop until ``pred()`` holds (bounded: no clock involved)."""
    for _ in range(limit):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def test_sim_engines_satisfy_the_protocols() -> None:
    p: PrefillEngine = SimPrefillEngine(engine_cfg(), PrefillConfig())
    d: DecodeEngine = SimDecodeEngine(engine_cfg(), DecodeConfig())
    for name in ("start", "stop", "prefill", "abort", "release", "expire_leases", "stats"):
        assert callable(getattr(p, name))
    for name in ("start", "stop", "stream", "stream_local", "abort", "stats"):
        assert callable(getattr(d, name))
    assert p.info.block_size == 32 and p.info.layout == d.info.layout


async def test_sim_prefill_then_decode_streams_the_prompts_tokens(engines) -> None:
    p, d = engines
    t = make_task("r1")
    out = await p.prefill(t)
    assert out.finish_reason is None and out.kv is not None and out.kv.num_tokens == 100
    assert len(out.kv.block_ids) == 4 and p.stats().exported_blocks == 4
    deltas = await collect(d, done_for(t, out))
    tokens = [out.first_token_id] + [tok for dl in deltas for tok in dl.token_ids]
    assert tokens == sim_tokens(PROMPT, 6)
    assert deltas[-1].finish_reason == "length" and all(dl.finish_reason is None for dl in deltas[:-1])
    assert deltas[0].kv_loaded_tokens == 100 and not deltas[0].kv_recomputed
    assert d.stats().kv_bytes_moved == 100 * d.cost.kv_bytes_per_token
    assert p.release(out.kv.ticket) and not p.release(out.kv.ticket)
    assert p.stats().exported_blocks == 0


async def test_sim_prefill_reuses_the_cached_prefix(engines) -> None:
    p, _ = engines
    first = await p.prefill(make_task("a", max_tokens=1))
    again = await p.prefill(make_task("b", PROMPT + [7] * 40, max_tokens=1))
    assert first.cached_tokens == 0 and again.cached_tokens == 96
    assert first.kv is None and first.finish_reason == "length"  # max_tokens=1: done in prefill
    assert p.stats().exported_blocks == 0


async def test_sim_prefill_salts_hashes_per_tenant() -> None:
    p = SimPrefillEngine(engine_cfg(), PrefillConfig(), CacheConfig(tenant_salt_secret="secret"))
    await p.start()
    try:
        await p.prefill(make_task("a", max_tokens=1, tenant="alice"))
        other = await p.prefill(make_task("b", max_tokens=1, tenant="bob"))
        same = await p.prefill(make_task("c", max_tokens=1, tenant="alice"))
        assert other.cached_tokens == 0 and same.cached_tokens == 96
    finally:
        await p.stop()


@pytest.mark.parametrize("how", ["released", "expired", "region_gone"])
async def test_sim_decode_recomputes_when_the_kv_is_gone(engines, how: str) -> None:
    p, d = engines
    t = make_task("r1")
    out = await p.prefill(t)
    if how == "released":
        assert p.release(out.kv.ticket)
    elif how == "expired":
        assert p.expire_leases(out.kv.lease_expires_ms - 1) == 0
        assert p.expire_leases(out.kv.lease_expires_ms) == 1
    else:
        await p.stop()
    deltas = await collect(d, done_for(t, out))
    assert deltas[0].kv_recomputed and deltas[0].kv_loaded_tokens == 0
    assert [out.first_token_id] + [x for dl in deltas for x in dl.token_ids] == sim_tokens(PROMPT, 6)
    assert d.stats().extra["recomputed"] == 1 and d.stats().kv_bytes_moved == 0


async def test_sim_decode_imports_in_another_process(engines, tmp_path) -> None:
    """The decode side needs nothing but the descriptor: here it runs in a fresh interpreter."""
    p, _ = engines
    t = make_task("r1", max_tokens=4)
    out = await p.prefill(t)
    msg = tmp_path / "done.bin"
    msg.write_bytes(pack(done_for(t, out)))
    script = (
        "import asyncio, json, sys\n"
        "from kvrelay.schemas.codec import unpack\n"
        "from kvrelay.schemas.messages import PrefillDone\n"
        "from kvrelay.workers.config import DecodeConfig, EngineConfig\n"
        "from kvrelay.workers.sim import SimDecodeEngine\n"
        "async def main():\n"
        "    cfg = EngineConfig(kind='sim', sim_time_scale=0.0)\n"
        "    d = SimDecodeEngine(cfg, DecodeConfig())\n"
        "    await d.start()\n"
        "    done = unpack(open(sys.argv[1], 'rb').read(), PrefillDone)\n"
        "    ds = [x async for x in d.stream(done)]\n"
        "    await d.stop()\n"
        "    print(json.dumps({'tokens': [t for x in ds for t in x.token_ids],\n"
        "                      'loaded': ds[0].kv_loaded_tokens, 'recomputed': ds[0].kv_recomputed}))\n"
        "asyncio.run(main())\n"
    )
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(msg),
                                                stdout=pipe, stderr=pipe)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 50)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    got = json.loads(stdout.decode().strip().splitlines()[-1])
    assert got == {"tokens": sim_tokens(PROMPT, 4)[1:], "loaded": 100, "recomputed": False}


async def test_sim_prefill_export_full_pushes_back() -> None:
    # one modelled block of the cpu preset is 32 * 46,080 B = 1.4 MiB: 2 MiB holds one block
    p = SimPrefillEngine(engine_cfg(), PrefillConfig(export_mb=2))
    await p.start()
    try:
        assert p.stats().export_free_blocks == 1
        with pytest.raises(ExportFull):
            await p.prefill(make_task("big"))
        small = await p.prefill(make_task("small", PROMPT[:20]))
        assert small.kv is not None and p.stats().export_free_blocks == 0
    finally:
        await p.stop()


async def test_sim_prefill_abort_while_computing() -> None:
    p = SimPrefillEngine(engine_cfg(scale=1.0), PrefillConfig())  # 100 tokens: ~0.3 s modelled
    await p.start()
    try:
        run = asyncio.ensure_future(p.prefill(make_task("r1", list(range(3000)))))
        await until(lambda: p.stats().running == 1)
        await p.abort("r1")
        out = await asyncio.wait_for(run, 5)
        assert out.finish_reason == "abort" and out.kv is None and p.stats().exported_blocks == 0
        assert p.blocks.running == 0  # the blocks were given back (and stay cached)
    finally:
        await p.stop()


async def test_sim_decode_abort_ends_the_stream() -> None:
    p = SimPrefillEngine(engine_cfg(), PrefillConfig())
    d = SimDecodeEngine(engine_cfg(scale=1.0), DecodeConfig())  # ~77 ms a step: 1000 tokens take long
    await p.start()
    await d.start()
    try:
        t = make_task("r1", max_tokens=1000)
        out = await p.prefill(t)
        stream = d.stream(done_for(t, out))
        first = await asyncio.wait_for(stream.__anext__(), 10)
        assert first.finish_reason is None and first.token_ids
        await d.abort("r1")
        rest = [x async for x in stream]
        assert rest[-1].finish_reason == "abort"
        assert d.stats().running == 0 and d.blocks.running == 0
    finally:
        await d.stop()
        await p.stop()


async def test_sim_decode_batches_sequences_in_steps(engines) -> None:
    p, d = engines
    tasks = [make_task(f"r{i}", [i] * 70, max_tokens=20) for i in range(4)]
    outs = [await p.prefill(t) for t in tasks]
    streams = await asyncio.gather(*(collect(d, done_for(t, o)) for t, o in zip(tasks, outs)))
    for t, o, deltas in zip(tasks, outs, streams):
        got = [o.first_token_id] + [x for dl in deltas for x in dl.token_ids]
        assert got == sim_tokens(t.prompt_token_ids, 20)
    assert d.stats().extra["steps"] < 4 * 19  # sequences shared steps


def test_sim_engine_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(UnknownPreset, match="cpu-smollm2"):
        SimPrefillEngine(engine_cfg(sim_preset="tpu-9000"), PrefillConfig())
