"""TTFT of a long prompt through the disaggregated path on real vLLM, split into its parts.

``kvrelay bench transfer --ttft``. One ``VllmPrefillEngine`` (serving shm and tcp) and, per
backend, one ``VllmDecodeEngine`` reading only with that backend, all in this process (their
EngineCores are child processes). Per backend, ``--repeats`` distinct random prompts of
``--tokens`` tokens (no prefix cache hits) go prefill -> export -> transfer -> first decode step.
Reported (medians):

    prefill_compute_ms    vLLM's prefill on the prefill engine (submit -> first token)
    export_ms             first token -> the connector's export notice (one engine step + copy 1)
    export_copy_ms        of which the copy vLLM cache -> export region
    transfer_ms           the decode connector's read (copy 2, through the backend), as it reported it
    first_decode_step_ms  decode submit -> first decoded token, minus transfer_ms: scheduling,
                          the one-token prefill of the first token and sampling
    decode_step_ms        the next decode step (second -> third token), for scale
    ttft_ms               prefill_compute_ms + export_ms + transfer_ms + first_decode_step_ms
    local_prefill_ms      the same prompt length prefilled by the decode engine itself (no transfer)

    kvrelay bench transfer --ttft --model smollm2 --dtype float32 --tokens 4096 \
        --backend shm tcp --out loadtest/results/transfer_ttft_smollm2.json
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
from typing import Any

from kvrelay import models
from kvrelay.loadtest.report import emit
from kvrelay.schemas.messages import PrefillDone, PrefillTask, SamplingSpec
from kvrelay.transport.kv.region import block_nbytes
from kvrelay.workers.config import DecodeConfig, EngineConfig, PrefillConfig
from kvrelay.workers.vllm_engine import VllmDecodeEngine, VllmPrefillEngine


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay bench transfer --ttft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--backend", nargs="+", default=["shm", "tcp"], choices=["shm", "cma", "tcp"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--json", action="store_true", help="(the report is always JSON)")
    p.add_argument("--out", type=Path)
    return p


async def _one(p: VllmPrefillEngine, d: VllmDecodeEngine, prompt: list[int], tag: str) -> dict[str, float]:
    spec = SamplingSpec(max_tokens=4, temperature=0.0, ignore_eos=True)
    task = PrefillTask(request_id=f"ttft-{tag}", tenant="t", prompt_token_ids=prompt, sampling=spec,
                       stream_subject="s", deadline_ms=0)
    exp0, imp0, n0 = p.counters["export_copy_ms"], d.counters["import_ms"], d.counters["imports"]
    t0 = time.perf_counter()
    out = await p.prefill(task)
    total_ms = (time.perf_counter() - t0) * 1000
    assert out.kv is not None, "the prefill exported no KV"
    done = PrefillDone(request_id=task.request_id, tenant="t", prompt_token_ids=prompt,
                       first_token_id=out.first_token_id, sampling=spec, stream_subject="s", deadline_ms=0,
                       prefill_worker=p.worker_id, kv=out.kv)
    t1 = time.perf_counter()
    stream = d.stream(done)
    first = await stream.__anext__()
    first_ms = (time.perf_counter() - t1) * 1000
    stamps = [time.perf_counter()]
    async for _ in stream:
        stamps.append(time.perf_counter())
    p.release(out.kv.ticket)
    assert first.kv_loaded_tokens == len(prompt) and d.counters["imports"] == n0 + 1, "the KV was not loaded"
    transfer_ms = d.counters["import_ms"] - imp0
    return {
        "prefill_compute_ms": out.prefill_ms,
        "export_ms": total_ms - out.prefill_ms,
        "export_copy_ms": p.counters["export_copy_ms"] - exp0,
        "transfer_ms": transfer_ms,
        "first_decode_step_ms": first_ms - transfer_ms,
        "decode_step_ms": (stamps[-1] - stamps[0]) * 1000 / max(1, len(stamps) - 1),
        "ttft_ms": total_ms + first_ms,
    }


async def _local(d: VllmDecodeEngine, prompt: list[int], out_kv: Any, tag: str) -> float:
    """The decode engine prefills the prompt itself (a descriptor it cannot read)."""
    spec = SamplingSpec(max_tokens=2, temperature=0.0, ignore_eos=True)
    done = PrefillDone(request_id=f"local-{tag}", tenant="t", prompt_token_ids=prompt,
                       first_token_id=prompt[-1], sampling=spec, stream_subject="s", deadline_ms=0,
                       prefill_worker="none",
                       kv=out_kv.replace(host="-", fallbacks=[], num_tokens=len(prompt)))
    t0 = time.perf_counter()
    stream = d.stream(done)
    first = await stream.__anext__()
    ms = (time.perf_counter() - t0) * 1000
    async for _ in stream:
        pass
    assert first.kv_recomputed
    return ms


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ec = EngineConfig(model=str(models.resolve(args.model)), dtype=args.dtype,
                      max_model_len=max(args.tokens) + 64, kv_cache_gb=args.kv_cache_gb, max_num_seqs=4)
    p = VllmPrefillEngine(ec, PrefillConfig(export_mb=512, backends=["shm", "tcp"]))
    await p.start()
    rng = random.Random(0)
    results = []
    try:
        for backend in args.backend:
            d = VllmDecodeEngine(ec, DecodeConfig(backends=[backend], transfer_timeout_s=60.0))
            await d.start()
            try:
                await _one(p, d, [rng.randrange(100, 40_000) for _ in range(64)], f"warm-{backend}")
                for tokens in args.tokens:
                    runs = []
                    for i in range(args.repeats):
                        prompt = [rng.randrange(100, 40_000) for _ in range(tokens)]
                        runs.append(await _one(p, d, prompt, f"{backend}-{tokens}-{i}"))
                    row = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
                    nbytes = -(-tokens // p.info.block_size) * block_nbytes(p.info.layout)
                    row["transfer_gb_per_s"] = round(nbytes / row["transfer_ms"] / 1e6, 3)
                    if backend == args.backend[0]:
                        prompt = [rng.randrange(100, 40_000) for _ in range(tokens)]
                        out = await p.prefill(PrefillTask(
                            request_id=f"probe-{tokens}", tenant="t", prompt_token_ids=prompt[:64],
                            sampling=SamplingSpec(max_tokens=2), stream_subject="s", deadline_ms=0))
                        p.release(out.kv.ticket)
                        row["local_prefill_ms"] = round(await _local(d, prompt, out.kv, str(tokens)), 3)
                    results.append({"backend": backend, "tokens": tokens, "kv_bytes": nbytes,
                                    "repeats": args.repeats, **row})
            finally:
                await d.stop()
    finally:
        await p.stop()
    return {
        "benchmark": "kv_transfer.ttft_split",
        "model": args.model,
        "layout": p.info.layout.to_mapping() if p.info.layout else None,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report = asyncio.run(run(args))
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
