"""Engine step times per dtype on this CPU (``kvrelay bench steps``): which dtype to serve with.

For each dtype, a child process pinned to one core (``--core``, ``OMP_NUM_THREADS=1``) starts a
plain vLLM engine (``LLM``, enforce_eager, prefix caching off so every prefill is computed) and
measures:

- a decode step at each batch size: ``batch`` random prompts of ``--context`` tokens generate
  ``--steps`` + 1 tokens and then 1 token; the difference over ``--steps`` is the time per step
  (the prefills cancel out). Median over ``--repeats``.
- a prefill of each ``--prefill-tokens`` length (one prompt, max_tokens 1). Median over repeats.

The report also says what ``engine.dtype="auto"`` resolves to here and why (the CPU's bf16 math).

    kvrelay bench steps --model smollm2 --out loadtest/results/engine_steps_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvrelay.loadtest.report import emit
from kvrelay.loadtest.run import conditions


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay bench steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="kvrelay model name or folder")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--context", type=int, default=128, help="prompt tokens of each decoding sequence")
    p.add_argument("--steps", type=int, default=100, help="decode steps timed per measurement")
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--core", type=int, default=os.cpu_count() - 1 if os.cpu_count() else 0,
                   help="the core each engine is pinned to (default: the last one)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per dtype")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one dtype, in a pinned process
    return p


def _check(args: argparse.Namespace) -> None:
    if not args.batch or min(args.batch) < 1 or args.steps < 1 or args.repeats < 1 or args.context < 1:
        raise SystemExit("kvrelay bench steps: --batch, --steps, --repeats and --context must be >= 1")
    if not args.prefill_tokens or min(args.prefill_tokens) < 1:
        raise SystemExit("kvrelay bench steps: --prefill-tokens must be >= 1")
    if args.core not in os.sched_getaffinity(0):
        raise SystemExit(f"kvrelay bench steps: --core {args.core} is not a core this process may use")


def _measure(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """In the pinned child: start vLLM, time decode steps and prefills."""
    from kvrelay.models import resolve
    from kvrelay.workers.vllm_engine import env

    env.apply("nobind")
    from vllm import LLM, SamplingParams

    longest = max([*args.prefill_tokens, args.context + args.steps + 2])
    llm = LLM(model=str(resolve(args.model)), dtype=dtype, max_model_len=max(longest + 8, 256),
              max_num_seqs=max(args.batch), kv_cache_memory_bytes=1 << 30, block_size=32,
              enforce_eager=True, seed=0, enable_prefix_caching=False)
    rng = random.Random(0)

    def prompts(n: int, length: int) -> list[dict[str, list[int]]]:
        return [{"prompt_token_ids": [rng.randrange(100, 30_000) for _ in range(length)]} for _ in range(n)]

    def run(p: list, n: int) -> float:
        sp = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
        t0 = time.perf_counter()
        llm.generate(p, sp, use_tqdm=False)
        return time.perf_counter() - t0

    run(prompts(1, 64), 4)  # first-call costs
    decode = {}
    for b in args.batch:
        per = []
        for _ in range(args.repeats):
            p = prompts(b, args.context)
            per.append((run(p, args.steps + 1) - run(p, 1)) / args.steps * 1e3)
        decode[str(b)] = round(statistics.median(per), 2)
    prefill = {str(n): round(statistics.median(run(prompts(1, n), 1) * 1e3 for _ in range(args.repeats)), 1)
               for n in args.prefill_tokens}
    return {"decode_step_ms_by_batch": decode, "prefill_ms_by_tokens": prefill}


def _child(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "kvrelay.loadtest.bench_steps", "--child", dtype, "--model", args.model,
            "--batch", *map(str, args.batch), "--context", str(args.context), "--steps", str(args.steps),
            "--prefill-tokens", *map(str, args.prefill_tokens), "--repeats", str(args.repeats),
            "--core", str(args.core)]
    environ = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout_s, env=environ)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {args.timeout_s:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"exit code {proc.returncode}: {proc.stderr[-2000:]}"}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    if args.child:
        os.sched_setaffinity(0, {args.core})  # before vLLM starts: its threads inherit it
        print(json.dumps(_measure(args, args.child)), flush=True)
        return 0
    from kvrelay.workers.vllm_engine.env import cpu_has_bf16_math, resolve_dtype

    auto = resolve_dtype("auto")
    report: dict[str, Any] = {
        "kind": "kvrelay-bench-steps", "version": 1, "model": args.model,
        "conditions": conditions() | {"core": args.core, "omp_threads": 1, "context_tokens": args.context,
                                      "steps_timed": args.steps, "repeats": args.repeats,
                                      "engine": "vLLM LLM, enforce_eager, prefix caching off"},
        "cpu_bf16_math": cpu_has_bf16_math(),
        "auto_dtype": "bfloat16" if auto == "auto" else auto,
        "dtypes": {d: _child(args, d) for d in args.dtype},
    }
    emit(report, args.out)
    return 1 if any("error" in r for r in report["dtypes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
