"""Disaggregated prefill -> decode through the shared-memory export region, on real vLLM.

One ``VllmPrefillEngine`` and one ``VllmDecodeEngine`` in this process (their EngineCores are
child processes). For each prompt length, ``--repeats`` distinct random prompts (no prefix
cache hits) go through: prefill (vLLM, max_tokens=1) -> export copy into the region (inside
vLLM's process) -> decode engine import (a thread in the decode EngineCore) -> first decoded
token. As the reference, the same decode engine also serves each prompt by prefilling it
locally (descriptor withheld). Reported per length: medians of

- ``prefill_ms``: vLLM's prefill of the prompt (submit -> first token), on the prefill engine
- ``export_wait_ms``: first token -> the connector's export notice (includes one engine step)
- ``export_copy_ms`` / ``import_copy_ms``: the block copies themselves (vLLM cache <-> region)
- ``decode_ttft_ms``: decode submit -> first decoded token, with the KV imported
- ``local_ttft_ms``: the same on the decode engine with the prompt prefilled locally

    python -m kvrelay.loadtest.bench_kv_transfer --model tiny --tokens 1000 \
        --out loadtest/results/kv_transfer_tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import time
from pathlib import Path

from kvrelay import models
from kvrelay.loadtest.report import emit
from kvrelay.schemas.messages import PrefillDone, PrefillTask, SamplingSpec
from kvrelay.transport.kv.region import block_nbytes
from kvrelay.workers.config import DecodeConfig, EngineConfig, PrefillConfig
from kvrelay.workers.vllm_engine import VllmDecodeEngine, VllmPrefillEngine


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_kv_transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model name or folder")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kv-cache-gb", type=float, default=0.5)
    p.add_argument("--out", type=Path)
    return p


async def _one(
    p: VllmPrefillEngine, d: VllmDecodeEngine, prompt: list[int], other: list[int], tag: str
) -> dict[str, float]:
    """``prompt`` goes through the transfer; ``other`` (same length, never seen) is prefilled locally."""
    spec = SamplingSpec(max_tokens=3, temperature=0.0, ignore_eos=True)
    task = PrefillTask(
        request_id=f"bench-{tag}",
        tenant="t",
        prompt_token_ids=prompt,
        sampling=spec,
        stream_subject="s",
        deadline_ms=0,
    )
    exp0, imp0 = p.counters["export_copy_ms"], d.counters["import_ms"]
    t0 = time.perf_counter()
    out = await p.prefill(task)
    total_ms = (time.perf_counter() - t0) * 1000
    assert out.kv is not None
    done = PrefillDone(
        request_id=task.request_id,
        tenant="t",
        prompt_token_ids=prompt,
        first_token_id=out.first_token_id,
        sampling=spec,
        stream_subject="s",
        deadline_ms=0,
        prefill_worker=p.worker_id,
        kv=out.kv,
    )
    ttft, first = await _ttft(d, done)
    p.release(out.kv.ticket)
    assert first.kv_loaded_tokens == len(prompt), "the KV was not imported"
    local = done.replace(
        request_id=task.request_id + "-local", prompt_token_ids=other, kv=out.kv.replace(host="-", fallbacks=[])
    )
    local_ttft, first = await _ttft(d, local)
    assert first.kv_recomputed
    return {
        "prefill_ms": out.prefill_ms,
        "export_wait_ms": total_ms - out.prefill_ms,
        "export_copy_ms": p.counters["export_copy_ms"] - exp0,
        "import_copy_ms": d.counters["import_ms"] - imp0,
        "decode_ttft_ms": ttft,
        "local_ttft_ms": local_ttft,
    }


async def _ttft(d: VllmDecodeEngine, done: PrefillDone):
    t0 = time.perf_counter()
    stream = d.stream(done)
    first = await stream.__anext__()
    ms = (time.perf_counter() - t0) * 1000
    async for _ in stream:
        pass
    return ms, first


async def run(args: argparse.Namespace) -> dict[str, object]:
    model = str(models.resolve(args.model))
    ec = EngineConfig(
        model=model, dtype=args.dtype, max_model_len=max(args.tokens) + 64, kv_cache_gb=args.kv_cache_gb
    )
    p = VllmPrefillEngine(ec, PrefillConfig(export_mb=256))
    d = VllmDecodeEngine(ec, DecodeConfig())
    await p.start()
    await d.start()
    rng = random.Random(0)
    results = []
    try:

        def prompt(n: int) -> list[int]:
            return [rng.randrange(100, 40_000) for _ in range(n)]

        await _one(p, d, prompt(64), prompt(64), "warmup")
        for tokens in args.tokens:
            runs = [
                await _one(p, d, prompt(tokens), prompt(tokens), f"{tokens}-{i}") for i in range(args.repeats)
            ]
            medians = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
            kv_bytes = -(-tokens // p.info.block_size) * block_nbytes(p.info.layout)
            results.append({"tokens": tokens, "kv_bytes": kv_bytes, **medians})
    finally:
        await d.stop()
        await p.stop()
    return {
        "benchmark": "kv_transfer.shm",
        "model": args.model,
        "layout": p.info.layout.to_mapping() if p.info.layout else None,
        "cpu": platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report = asyncio.run(run(args))
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
