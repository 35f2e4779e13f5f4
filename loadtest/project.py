"""``kvrelay bench project``: SIMULATED scale projection, aggregated vs disaggregated, 8-32 GPUs.

    kvrelay bench project --out loadtest/results            (Llama-70B on H100, the default preset)

For each cluster size, each deployment shape (aggregated with chunked prefill at each
``--chunks`` budget; disaggregated at each prefill:decode ``--ratios``) runs the same seeded
workload through ``simcluster.simulate`` (a discrete-event simulation on a virtual clock timed by
a ``workers.sim.cost`` preset: no model runs) and finds the highest Poisson request rate at which
at least ``--attainment`` of requests meet the SLO (TTFT <= ``--slo-ttft-ms`` and TPOT <=
``--slo-tpot-ms``). That rate per GPU is DistServe's *per-GPU goodput* (Zhong et al., OSDI 2024).
Reported with it, at that rate: output tokens/s per GPU, TTFT / TPOT / ITL p99. Every figure is
simulated; the report states the cost model and its sources.

The rate search: double the rate until the SLO attainment falls below the goal, then bisect
(``--steps`` times). Attainment is measured over all ``--requests`` requests (one seeded Poisson
arrival sequence per rate; requests whose KV cannot fit a worker count as misses). The number of
requests grows with the cluster (``--requests-per-worker``), and the first ``--warmup-share`` of
arrivals (an empty cluster) are left out of every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrelay.loadtest.arrivals import poisson_times
from kvrelay.loadtest.metrics import Histogram
from kvrelay.loadtest.simcluster import Req, SimConfig, Stats, simulate
from kvrelay.loadtest.workloads import CONFIGS, generate
from kvrelay.workers.sim.cost import PRESETS, CostModel

# GPUs one worker of a preset spans (its source says how it was measured)
GPUS_PER_WORKER = {"h100-llama70b": 2, "cpu-smollm2": 1}
MAX_DOUBLINGS = 16  # the rate search gives up doubling past start * 2**16
LABEL = "SIMULATED (cost model, virtual clock; no model was run)"


@dataclass(frozen=True)
class Shape:
    name: str  # "aggregated (chunk 8192)" or "disaggregated 1:3"
    prefill: int  # 0 = aggregated
    chunk: int


@dataclass(frozen=True)
class Goal:
    ttft_s: float
    tpot_s: float
    attainment: float

    def attained(self, st: Stats, total: int, skip: int = 0) -> float:
        """The share of requests ``skip`` .. ``total - 1`` (by arrival) meeting both limits."""
        ok = 0
        for r in st.finished:
            if r.rid < skip:
                continue
            tpot = (r.done - r.first) / (r.output - 1) if r.output > 1 else 0.0
            ok += (r.first - r.arrival) <= self.ttft_s and tpot <= self.tpot_s
        return ok / max(1, total - skip)


def shapes(workers: int, ratios: list[tuple[int, int]], chunks: list[int]) -> list[Shape]:
    out = [Shape(f"aggregated (chunk {c})", 0, c) for c in chunks]
    seen = set()
    for p, d in ratios:
        n = min(workers - 1, max(1, round(workers * p / (p + d))))
        if n not in seen and workers >= 2:
            seen.add(n)
            out.append(Shape(f"disaggregated {n}P:{workers - n}D", n, chunks[0]))
    return out


def requests(lengths: list[tuple[int, int]], rate: float, seed: int) -> list[Req]:
    ts = poisson_times(len(lengths), rate, seed)
    return [Req(i, t, p, o) for i, ((p, o), t) in enumerate(zip(lengths, ts))]


def run_at(rate: float, lengths: list[tuple[int, int]], shape: Shape, cost: CostModel, workers: int,
           seed: int) -> Stats:
    reqs = requests(lengths, rate, seed)
    return simulate(reqs, SimConfig(cost, chunk_tokens=shape.chunk), workers, shape.prefill)


def window_tokens(st: Stats, t0: float, t1: float) -> float:
    """Output tokens emitted in [t0, t1]: the first at ``first``, the rest spread evenly to ``done``."""
    n = 0.0
    for r in st.finished:
        n += t0 <= r.first <= t1
        if r.output > 1 and r.done > r.first:
            overlap = max(0.0, min(t1, r.done) - max(t0, r.first))
            n += (r.output - 1) * overlap / (r.done - r.first)
    return n


def figures(st: Stats, total: int, skip: int, gpus: int) -> dict[str, Any]:
    """Latencies of the measured requests; throughput over their arrival window (no warm-up, no drain)."""
    ttft, tpot = Histogram(), Histogram()
    measured = [r for r in st.finished if r.rid >= skip]
    for r in measured:
        ttft.record_ms((r.first - r.arrival) * 1e3)
        if r.output > 1:
            tpot.record_ms((r.done - r.first) * 1e3 / (r.output - 1))
    t0 = min((r.arrival for r in measured), default=0.0)
    t1 = max((r.arrival for r in measured), default=0.0)
    wall = max(t1 - t0, 1e-9)
    return {"output_tok_per_s_per_gpu": round(window_tokens(st, t0, t1) / wall / gpus, 2),
            "ttft_ms_p50": ttft.percentile_ms(50), "ttft_ms_p99": ttft.percentile_ms(99),
            "tpot_ms_p50": tpot.percentile_ms(50), "tpot_ms_p99": tpot.percentile_ms(99),
            "itl_ms_p50": st.itl.percentile_ms(50), "itl_ms_p99": st.itl.percentile_ms(99),
            "completed": len(st.finished), "requests": total, "measured_from_request": skip,
            "rejected_kv_too_big": st.rejected}


def max_rate(lengths: list[tuple[int, int]], shape: Shape, cost: CostModel, workers: int, gpus: int,
             goal: Goal, seed: int, start: float, steps: int, skip: int = 0) -> dict[str, Any]:
    """The highest rate meeting the goal (doubling, then bisection), with its figures."""
    n = len(lengths)

    def ok(rate: float) -> tuple[bool, Stats]:
        st = run_at(rate, lengths, shape, cost, workers, seed)
        return goal.attained(st, n, skip) >= goal.attainment, st

    lo, lo_st, hi = 0.0, None, start
    good, st = ok(hi)
    for _ in range(MAX_DOUBLINGS):
        if not good:
            break
        lo, lo_st, hi = hi, st, hi * 2
        good, st = ok(hi)
    else:
        assert lo_st is not None
        return {"rate_req_per_s": round(lo, 4), "goodput_req_per_s_per_gpu": round(lo / gpus, 4),
                "note": f"SLO still met at {lo:g} req/s: the workload is too small to load this cluster",
                "attainment": round(goal.attained(lo_st, n, skip), 4),
                **figures(lo_st, n, skip, gpus)}
    if lo == 0.0:  # even the start rate fails: search below it
        hi_bad = hi
        for _ in range(steps):
            hi_bad /= 2
            good, st = ok(hi_bad)
            if good:
                lo, lo_st, hi = hi_bad, st, hi_bad * 2
                break
    if lo_st is None:
        return {"rate_req_per_s": 0.0, "goodput_req_per_s_per_gpu": 0.0,
                "note": "SLO not met at any rate tried"}
    for _ in range(steps):
        mid = (lo + hi) / 2
        good, st = ok(mid)
        if good:
            lo, lo_st = mid, st
        else:
            hi = mid
    return {"rate_req_per_s": round(lo, 4), "goodput_req_per_s_per_gpu": round(lo / gpus, 4),
            "attainment": round(goal.attained(lo_st, n, skip), 4), **figures(lo_st, n, skip, gpus)}


def project(args: argparse.Namespace) -> dict[str, Any]:
    cost = CostModel.preset(args.preset)
    gpw = GPUS_PER_WORKER.get(args.preset, 1)
    most = args.requests_per_worker * max(args.gpus) // gpw
    wl = generate(args.workload, args.seed, max_requests=most)
    all_lengths = [(len(r.prompt), r.output_len) for r in wl.requests()]
    goal = Goal(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3, args.attainment)
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    guess = 0.5
    for gpus in args.gpus:
        workers = gpus // gpw
        lengths = all_lengths[: args.requests_per_worker * workers]
        skip = int(len(lengths) * args.warmup_share)
        rows = {}
        for shape in shapes(workers, args.ratios, args.chunks):
            rows[shape.name] = max_rate(lengths, shape, cost, workers, gpus, goal, args.seed,
                                        max(0.05, guess * workers), args.steps, skip)
            print(f"[simulated] {gpus} GPUs, {shape.name}: {rows[shape.name]['goodput_req_per_s_per_gpu']} "
                  f"req/s/GPU", file=sys.stderr)
        best = max(rows, key=lambda k: rows[k]["goodput_req_per_s_per_gpu"])
        best_dis = max((k for k in rows if k.startswith("disagg")), default=None,
                       key=lambda k: rows[k]["goodput_req_per_s_per_gpu"])
        guess = max(0.05, rows[best]["rate_req_per_s"] / max(1, workers) / 2)
        results[f"{gpus}_gpus"] = {"gpus": gpus, "workers": workers, "shapes": rows, "best": best,
                                   "best_disaggregated_ratio": best_dis}
    mean_p = sum(p for p, _ in all_lengths) / len(all_lengths)
    mean_o = sum(o for _, o in all_lengths) / len(all_lengths)
    return {
        "kind": "kvrelay-bench-project", "version": 1, "label": LABEL,
        "cost_model": {"preset": args.preset, "gpus_per_worker": gpw, **cost.to_mapping(),
                       "source": "workers/sim/cost.py (H100_LLAMA70B: NVIDIA NIM LLM benchmarking guide, "
                                 "Llama-3.3-70B FP8 on 2xH100 TP2; transfer figures assumed)"},
        "model": "simulated: loadtest/simcluster.py (chunked-prefill continuous batching; pull-based decode)",
        "workload": {"name": args.workload, "seed": args.seed,
                     "requests_per_worker": args.requests_per_worker,
                     "warmup_share_excluded": args.warmup_share,
                     "mean_prompt_tokens": round(mean_p, 1), "mean_output_tokens": round(mean_o, 1),
                     "arrivals": "Poisson, each step of a session an independent request, no prefix reuse"},
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms, "attainment": args.attainment,
                "goodput": "highest request rate with >= attainment of requests meeting both, per GPU"},
        "results": results, "wall_s": round(time.monotonic() - t0, 1),
    }


def markdown(rep: dict[str, Any]) -> str:
    c, s, w = rep["cost_model"], rep["slo"], rep["workload"]
    lines = [f"# Scale projection — {rep['label']}", "",
             f"Cost model `{c['preset']}` (one worker = {c['gpus_per_worker']} GPUs): prefill "
             f"{c['prefill_tokens_per_s']:.0f} tok/s + {c['prefill_fixed_s'] * 1e3:.1f} ms per forward; "
             f"decode step {c['decode_fixed_s'] * 1e3:.1f} ms + {c['decode_per_seq_s'] * 1e3:.2f} ms per "
             f"sequence; KV {c['kv_bytes_per_token']} B/token, {c['kv_cache_gb']:g} GB per worker; transfer "
             f"{c['transfer_bytes_per_s'] / 1e9:g} GB/s + {c['transfer_latency_s'] * 1e3:g} ms. "
             f"Source: {c['source']}.",
             "", f"Workload `{w['name']}` (seed {w['seed']}, {w['requests_per_worker']} requests per worker, "
                 f"the first {w['warmup_share_excluded'] * 100:g} % left out as warm-up; mean prompt "
                 f"{w['mean_prompt_tokens']} / output {w['mean_output_tokens']} tokens; {w['arrivals']}). "
                 f"Output tokens/s are counted over the measured arrivals' window (no drain tail). "
                 f"SLO: TTFT <= {s['ttft_ms']:g} ms and TPOT <= {s['tpot_ms']:g} ms for >= "
                 f"{s['attainment'] * 100:g} % of requests.", "",
             "| GPUs | shape | goodput req/s/GPU (simulated) | output tok/s/GPU | TTFT p99 ms | TPOT p99 ms "
             "| ITL p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for res in rep["results"].values():
        for name, r in res["shapes"].items():
            star = " **(best)**" if name == res["best"] else ""
            lines.append(f"| {res['gpus']} | {name}{star} | {r['goodput_req_per_s_per_gpu']} | "
                         f"{r.get('output_tok_per_s_per_gpu', '-')} | {_f(r.get('ttft_ms_p99'))} | "
                         f"{_f(r.get('tpot_ms_p99'))} | {_f(r.get('itl_ms_p99'))} |")
    lines += ["", "Best prefill:decode ratio per size (simulated): " + ", ".join(
        f"{res['gpus']} GPUs -> {res['best_disaggregated_ratio']}" for res in rep["results"].values()), ""]
    return "\n".join(lines)


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}"


def _ratio(s: str) -> tuple[int, int]:
    p, _, d = s.partition(":")
    try:
        pr, dr = int(p), int(d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must look like 1:3, got {s!r}") from None
    if pr < 1 or dr < 1:
        raise argparse.ArgumentTypeError(f"ratio parts must be >= 1, got {s!r}")
    return pr, dr


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kvrelay bench project", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="h100-llama70b")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--ratios", type=_ratio, nargs="+", default=[(1, 3), (1, 2), (1, 1), (2, 1), (3, 1)])
    ap.add_argument("--chunks", type=int, nargs="+", default=[8192, 512],
                    help="chunked-prefill budgets (tokens per forward) of the aggregated shapes; the first "
                         "is also the prefill workers' (8192: vLLM's default for an H100 OpenAI server)")
    ap.add_argument("--workload", choices=sorted(CONFIGS), default="mix")
    ap.add_argument("--requests-per-worker", type=int, default=200,
                    help="simulated requests per worker (the cluster's load grows with its size)")
    ap.add_argument("--warmup-share", type=float, default=0.1,
                    help="leave out the first arrivals (empty-cluster warm-up) from every figure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=60.0)
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=7, help="bisection steps of the rate search")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    gpw = GPUS_PER_WORKER.get(args.preset, 1)
    for g in args.gpus:
        if g < 2 * gpw or g % gpw:
            ap.error(f"--gpus {g}: needs a multiple of {gpw} GPUs per worker and at least 2 workers")
    if not 0 < args.attainment <= 1 or args.requests_per_worker < 10 or args.steps < 1:
        ap.error("--attainment in (0, 1], --requests-per-worker >= 10, --steps >= 1")
    if not 0 <= args.warmup_share < 0.9:
        ap.error("--warmup-share must be in [0, 0.9)")
    return args


def main(argv: list[str]) -> int:
    args = _args(argv)
    rep = project(args)
    if args.out:
        from kvrelay.loadtest import plots

        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"projection_{args.preset.replace('-', '_')}"
        (args.out / f"{stem}.json").write_text(json.dumps(rep, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(rep))
        rows = {}
        for r in rep["results"].values():
            shapes_ = r["shapes"]
            row = {k: v["goodput_req_per_s_per_gpu"] for k, v in shapes_.items()
                   if k.startswith("aggregated")}
            best = r["best_disaggregated_ratio"]
            if best:
                row["disaggregated (best ratio)"] = shapes_[best]["goodput_req_per_s_per_gpu"]
            rows[f"{r['gpus']} GPUs (best: {r['best_disaggregated_ratio'] or '-'})"] = row
        plots.bars(rows, args.out / f"{stem}.png", f"{LABEL}\n{args.preset}: per-GPU goodput at the SLO",
                   "goodput (req/s per GPU)")
    print(json.dumps(rep, indent=2) if args.json else markdown(rep))
    return 0
