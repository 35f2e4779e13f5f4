"""Micro-benchmark of KV block gather/scatter (``kvrelay bench kernels``).

SmolLM2-135M-shaped KV (30 layers, 3 KV heads, head_dim 64, block_size 32, bf16; vLLM CPU pages
[H, bs, 2*D] = 24 KiB per (block, layer)) at several prompt lengths. The cache is one allocation
viewed per layer, as vLLM holds it, with twice the blocks needed; the request's blocks are a
random scattered subset. Timed: ``gather_blocks`` (cache -> contiguous buffer, preallocated
``out``), ``scatter_blocks`` (buffer -> cache) and, as the ceiling, a same-bytes contiguous
``torch`` copy. GB/s counts the payload once (a copy reads and writes it). CPU runs the torch
reference; CUDA runs Triton when it is installed. Prints JSON; ``--out`` also writes it.

    python -m kvrelay.loadtest.bench_kernels --device cpu --threads 1 --out loadtest/results/kernels_cpu.json

On a small shared machine pin ``--threads 1``: two OpenMP threads on two busy cores stall on
each other and the figures then measure the scheduler, not the copy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvrelay import kernels
from kvrelay.loadtest.report import emit

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 30, 3, 64, 32, torch.bfloat16


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384], help="prompt lengths")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median reported)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def seconds(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return seconds


def _measure(fn: Callable[[], object], nbytes: int, repeats: int, device: torch.device) -> dict[str, float]:
    seconds = _timer(device)
    fn()  # warm-up: first touch of pages, Triton compilation
    runs = [seconds(fn) for _ in range(repeats)]
    median = statistics.median(runs)
    return {
        "median_ms": round(median * 1e3, 3),
        "min_ms": round(min(runs) * 1e3, 3),
        "gb_per_s": round(nbytes / median / 1e9, 2),
    }


def bench_one(tokens: int, repeats: int, device: torch.device) -> dict[str, object]:
    n = -(-tokens // BLOCK_SIZE)
    page = (KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    alloc = torch.randn((LAYERS, 2 * n, *page), device=device).to(DTYPE)  # [L, NB, H, bs, 2D]
    layers = list(alloc.unbind(0))  # per-layer views of one allocation, as vLLM's
    ids = torch.randperm(2 * n, device=device)[:n]
    buf = torch.empty((n, LAYERS, *page), dtype=DTYPE, device=device)
    nbytes = buf.numel() * buf.element_size()
    copy_src, copy_dst = torch.empty_like(buf), torch.empty_like(buf)
    result = {
        "tokens": tokens,
        "blocks": n,
        "bytes": nbytes,
        "gather": _measure(
            lambda: kernels.gather_blocks(layers, ids, out=buf, check_ids=False), nbytes, repeats, device
        ),
        "scatter": _measure(
            lambda: kernels.scatter_blocks(buf, layers, ids, check_ids=False), nbytes, repeats, device
        ),
        "memcpy": _measure(lambda: copy_dst.copy_(copy_src), nbytes, repeats, device),
    }
    if not torch.equal(kernels.gather_blocks(layers, ids).view(torch.int16), buf.view(torch.int16)):
        raise RuntimeError("gather after scatter did not give the buffer back")
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _environment(device: torch.device, probe: torch.Tensor) -> dict[str, object]:
    env: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "backend": kernels.backend_for(probe),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        env["load_avg_1m_before"] = round(os.getloadavg()[0], 2)  # shared machines: context for the figures
    return env


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench kernels: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.repeats < 1 or any(t < 1 for t in args.tokens) or (args.threads is not None and args.threads < 1):
        print("bench kernels: --repeats, --tokens and --threads must be >= 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    report = {
        "benchmark": "kernels.gather_scatter",
        "model": {
            "layers": LAYERS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE,
            "dtype": str(DTYPE).removeprefix("torch."),
            "page": "vLLM CPU [H, bs, 2*D]",
        },
        **_environment(device, torch.empty(0, device=device)),
        "repeats": args.repeats,
        "results": [bench_one(tokens, args.repeats, device) for tokens in args.tokens],
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
