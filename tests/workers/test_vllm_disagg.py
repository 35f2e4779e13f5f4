"""Prefill engine -> shared-memory export region -> decode engine, on real vLLM (tiny model).

Three engines, each started once for the module: a plain vLLM (no connector) that gives the
reference greedy outputs and is shut down before the others start, a VllmPrefillEngine and a
VllmDecodeEngine. Every test uses its own prompts, so the decode engine's prefix cache never
serves a prompt from a previous test (which would hide whether the KV was transferred).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time

import pytest
import pytest_asyncio

from kvrelay import models
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.schemas.messages import PrefillDone, PrefillTask, SamplingSpec
from kvrelay.workers.config import DecodeConfig, EngineConfig, PrefillConfig
from kvrelay.workers.engine import PrefillOutput, TokenDelta
from kvrelay.workers.vllm_engine import env
from kvrelay.workers.vllm_engine.engine import VllmDecodeEngine, VllmPrefillEngine

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

MAX_TOKENS = 12
GIB = 1 << 30


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40_000) for _ in range(n)]


PROMPTS: dict[str, list[int]] = {
    "main_301": _prompt(1, 301),  # last block partly filled
    "main_320": _prompt(2, 320),  # last block exactly full
    "zeroed": _prompt(3, 200),
    "released": _prompt(4, 150),
    "expired": _prompt(5, 170),
    "unreadable": _prompt(6, 90),
    "probe": _prompt(7, 40),
    "stop": _prompt(8, 64),
    "prefix_base": _prompt(9, 200),
    "prefix_ext": _prompt(9, 200) + _prompt(10, 90),  # shares 6 full blocks with prefix_base
    "local_base": _prompt(11, 130),  # 4 full blocks
    "local_ext": _prompt(11, 130) + _prompt(12, 40),  # the next step: local prefill on the decode engine
    **{f"conc{i}": _prompt(100 + i, 40 + 45 * i) for i in range(8)},
}


@pytest.fixture(scope="module")
def engine_cfg() -> EngineConfig:
    return EngineConfig(
        model=str(models.resolve("tiny")),
        dtype="float32",
        max_model_len=2048,
        kv_cache_gb=0.25,
        max_num_seqs=16,
    )


async def _plain_vllm_outputs(engine_cfg: EngineConfig) -> dict[str, tuple[list[int], str]]:
    env.apply()
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=engine_cfg.model,
        dtype="float32",
        block_size=CacheConfig().block_size,
        max_model_len=engine_cfg.max_model_len,
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=int(engine_cfg.kv_cache_gb * GIB),
    )
    llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

    async def run(engine: AsyncLLM, name: str, prompt: list[int]) -> tuple[str, tuple[list[int], str]]:
        tokens = TokensPrompt(prompt_token_ids=prompt)
        async for out in engine.generate(tokens, sp, request_id=f"base-{name}"):
            final = out
        text = engine.get_tokenizer().decode(final.outputs[0].token_ids[:1])
        return name, (list(final.outputs[0].token_ids), text)

    try:
        return dict(await asyncio.gather(*(run(llm, n, p) for n, p in PROMPTS.items())))
    finally:
        llm.output_handler.cancel()
        await asyncio.gather(llm.output_handler, return_exceptions=True)
        await asyncio.to_thread(llm.shutdown)
        del llm


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def baseline(engine_cfg: EngineConfig) -> dict[str, tuple[list[int], str]]:
    """Greedy tokens (and the first token's text) of every prompt from a plain vLLM, no connector."""
    outputs = await _plain_vllm_outputs(engine_cfg)
    gc.collect()  # the plain AsyncLLM sits in reference cycles: collect it before the next engines start
    return outputs


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(baseline, engine_cfg: EngineConfig):
    prefill = VllmPrefillEngine(engine_cfg, PrefillConfig(export_mb=64, lease_s=30.0))
    # the loader threads bound to a core of their own (decode.kv_load_cpus): every test below runs that path
    load_cpu = str(max(os.sched_getaffinity(0)))
    decode = VllmDecodeEngine(engine_cfg, DecodeConfig(transfer_timeout_s=10.0, kv_load_cpus=load_cpu))
    try:
        await prefill.start()
        await decode.start()
        yield prefill, decode
    finally:
        await decode.stop()
        await prefill.stop()


def _task(name: str, max_tokens: int = MAX_TOKENS, **sampling) -> PrefillTask:
    spec = SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling)
    return PrefillTask(
        request_id=f"req-{name}-{time.monotonic_ns()}",
        tenant="t",
        prompt_token_ids=PROMPTS[name],
        sampling=spec,
        stream_subject="s",
        deadline_ms=0,
    )


def _done(task: PrefillTask, out: PrefillOutput) -> PrefillDone:
    assert out.kv is not None and out.finish_reason is None
    return PrefillDone(
        request_id=task.request_id,
        tenant=task.tenant,
        prompt_token_ids=task.prompt_token_ids,
        first_token_id=out.first_token_id,
        sampling=task.sampling,
        stream_subject="s",
        deadline_ms=0,
        prefill_worker="p",
        kv=out.kv,
    )


async def _decode(decode: VllmDecodeEngine, done: PrefillDone) -> tuple[list[int], TokenDelta, TokenDelta]:
    deltas = [d async for d in decode.stream(done)]
    tokens = [done.first_token_id] + [t for d in deltas for t in d.token_ids]
    return tokens, deltas[0], deltas[-1]


async def _disagg(prefill: VllmPrefillEngine, decode: VllmDecodeEngine, name: str):
    task = _task(name)
    out = await prefill.prefill(task)
    done = _done(task, out)
    tokens, first, last = await _decode(decode, done)
    return done, tokens, first, last


async def _until_no_blocks_held(engine, timeout_s: float = 30.0) -> None:
    """vLLM's reset_prefix_cache succeeds only when no block is held: wait for that (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not await engine.reset_prefix_cache():
        assert time.monotonic() < deadline, "vLLM still holds KV blocks"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("name", ["main_301", "main_320"])
async def test_vllm_disagg_greedy_output_matches_plain_vllm(engines, baseline, name: str) -> None:
    prefill, decode = engines
    done, tokens, first, last = await _disagg(prefill, decode, name)
    assert tokens == baseline[name][0]
    assert first.kv_loaded_tokens == len(PROMPTS[name]) and not first.kv_recomputed
    assert last.finish_reason == "length"
    assert done.kv.num_tokens == len(PROMPTS[name])
    assert len(done.kv.block_ids) == -(-len(PROMPTS[name]) // 32)
    assert prefill.stats().exported_blocks >= len(done.kv.block_ids)  # held until released
    assert prefill.release(done.kv.ticket) is True
    assert prefill.release(done.kv.ticket) is False


async def test_vllm_disagg_zeroed_kv_changes_output(engines, baseline) -> None:
    """The control: the same transfer with the loaded KV zeroed gives other tokens."""
    prefill, decode = engines
    decode.debug_zero_kv = True
    try:
        done, tokens, first, _ = await _disagg(prefill, decode, "zeroed")
    finally:
        decode.debug_zero_kv = False
        prefill.release(done.kv.ticket)
    assert first.kv_loaded_tokens == len(PROMPTS["zeroed"]) and not first.kv_recomputed
    assert tokens[0] == baseline["zeroed"][0][0]  # the prefill worker's token
    assert tokens[1:] != baseline["zeroed"][0][1:]
    await _until_no_blocks_held(decode)  # also drops the zeroed blocks from the prefix cache


async def test_vllm_disagg_prefix_cache_hit_loads_only_the_rest(engines, baseline) -> None:
    """A decode engine already holding a prompt's first blocks loads only the blocks after them."""
    prefill, decode = engines
    done, _, first, _ = await _disagg(prefill, decode, "prefix_base")
    prefill.release(done.kv.ticket)
    assert first.kv_loaded_tokens == 200
    done, tokens, first, _ = await _disagg(prefill, decode, "prefix_ext")
    prefill.release(done.kv.ticket)
    assert tokens == baseline["prefix_ext"][0]
    assert first.kv_loaded_tokens == 290 - 6 * 32 and not first.kv_recomputed


@pytest.mark.parametrize("how", ["released", "expired"])
async def test_vllm_disagg_lost_lease_falls_back_to_local_prefill(engines, baseline, how: str) -> None:
    prefill, decode = engines
    task = _task(how)
    out = await prefill.prefill(task)
    if how == "released":
        assert prefill.release(out.kv.ticket)
    else:  # the owner's clock says the lease is over (the reader's clock does not yet: tickets decide)
        assert prefill.expire_leases(out.kv.lease_expires_ms) >= 1
    failures = decode.stats().extra["import_failures"]
    tokens, first, last = await _decode(decode, _done(task, out))
    assert first.kv_recomputed and first.kv_loaded_tokens == 0
    assert tokens == baseline[how][0]
    assert last.finish_reason == "length"
    assert decode.stats().extra["import_failures"] == failures + 1


async def test_vllm_disagg_unreadable_descriptor_prefills_locally(engines, baseline) -> None:
    prefill, decode = engines
    task = _task("unreadable")
    out = await prefill.prefill(task)
    prefill.release(out.kv.ticket)
    # another host, and no backend that crosses hosts (tcp is dropped from what the exporter offers)
    done = _done(task, out).replace(kv=out.kv.replace(host="another-host", fallbacks=[]))
    tokens, first, _ = await _decode(decode, done)
    assert first.kv_recomputed
    assert tokens == baseline["unreadable"][0]


async def test_vllm_disagg_eight_concurrent_requests(engines, baseline) -> None:
    prefill, decode = engines
    names = [f"conc{i}" for i in range(8)]
    results = await asyncio.gather(*(_disagg(prefill, decode, n) for n in names))
    for name, (done, tokens, first, _) in zip(names, results, strict=True):
        assert tokens == baseline[name][0], name
        assert first.kv_loaded_tokens == len(PROMPTS[name]), name
        assert prefill.release(done.kv.ticket)
    stats = prefill.stats()
    assert stats.exported_blocks == 0 and stats.extra["orphans"] == 0


async def test_vllm_disagg_aborted_decode_leaks_no_blocks(engines, baseline) -> None:
    prefill, decode = engines
    long_task = _task("probe", max_tokens=400)
    out = await prefill.prefill(long_task)

    # 1: cancelled before its first token (the load may be in flight)
    early = asyncio.create_task(_decode(decode, _done(long_task, out)))
    await asyncio.sleep(0)
    early.cancel()
    with pytest.raises(asyncio.CancelledError):
        await early

    # 2: the consumer stops reading after the first token
    again = long_task.replace(request_id=long_task.request_id + "-2")
    stream = decode.stream(_done(again, out))
    first = await stream.__anext__()
    assert first.token_ids
    await stream.aclose()

    prefill.release(out.kv.ticket)
    # a request after the aborts still completes correctly
    _, tokens, _, _ = await _disagg(prefill, decode, "stop")
    assert tokens == baseline["stop"][0]
    await _until_no_blocks_held(decode)
    await _until_no_blocks_held(prefill)
    assert decode.stats().extra["aborted"] >= 2


async def test_vllm_prefill_finished_in_prefill_holds_no_export(engines, baseline) -> None:
    prefill, _ = engines
    held = prefill.stats().exported_blocks
    # the user asked for one token: it is the whole answer
    out = await prefill.prefill(_task("stop", max_tokens=1))
    assert out.finish_reason == "length" and out.kv is None
    assert out.first_token_id == baseline["stop"][0][0]
    # a stop string matching the first token: vLLM's scheduler already exported, the engine frees it
    text = baseline["stop"][1]
    assert text.strip(), "the reference's first token should have visible text"
    out = await prefill.prefill(_task("stop", stop=[text]))
    assert out.finish_reason == "stop" and out.kv is None
    stats = prefill.stats()
    assert stats.exported_blocks == held and stats.extra["orphans"] == 0


async def test_vllm_disagg_local_prefill_gives_the_normal_paths_tokens(engines, baseline) -> None:
    """Decode affinity: the decode engine that ran a step prefills the next one itself (no KV
    transfer); its prefix cache serves the blocks it holds, and the greedy tokens are the same."""
    prefill, decode = engines
    done, tokens, _, _ = await _disagg(prefill, decode, "local_base")
    prefill.release(done.kv.ticket)
    assert tokens == baseline["local_base"][0]
    imports = decode.counters["imports"]
    deltas = [d async for d in decode.stream_local(_task("local_ext"))]
    local = [t for d in deltas for t in d.token_ids]
    assert local == baseline["local_ext"][0]
    assert deltas[0].cached_tokens == 128  # local_base's 4 full blocks were not computed again
    assert deltas[-1].finish_reason == "length" and decode.counters["imports"] == imports
    assert decode.counters["local_prefills"] >= 1
    done2, normal, _, _ = await _disagg(prefill, decode, "local_ext")  # the normal path, for comparison
    prefill.release(done2.kv.ticket)
    assert normal == local


@pytest.mark.parametrize("local", [False, True])
async def test_vllm_decode_stream_first_read_in_a_task_closes_cleanly(engines, baseline, local: bool) -> None:
    """The decode worker reads a stream's first delta in a task of its own (to keep the work-queue
    message alive meanwhile) and closes the stream from its own task: the close must not fail
    (a log context bound inside the stream would belong to the other task's context)."""
    prefill, decode = engines
    task = _task("conc6" if local else "conc7", max_tokens=40)
    if local:
        stream = decode.stream_local(task)
    else:
        out = await prefill.prefill(task)
        stream = decode.stream(_done(task, out))
    first = await asyncio.ensure_future(stream.__anext__())
    assert first.token_ids
    await stream.aclose()  # raised ValueError (a contextvar token from another Context) before
    if not local:
        prefill.release(out.kv.ticket)
