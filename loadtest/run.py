"""``kvrelay bench run``: drive a running deployment with a workload and report its numbers.

    kvrelay bench run --url http://127.0.0.1:8000 --workload mix --arrival poisson:0.5 \\
        --requests 200 --slo-ttft-ms 2000 --slo-itl-ms 200 --max-context 4096 --out results/run1
    kvrelay bench run --nats-url nats://127.0.0.1:4222 --trace mooncake.jsonl --duration 300

Targets: ``--url`` (any OpenAI-compatible server: kvrelay's router, vLLM, a proxy) or
``--nats-url`` (kvrelay's NATS intake). Sources: ``--workload`` (``loadtest.workloads``,
seeded) or ``--trace`` (``loadtest.trace``). Arrivals: ``loadtest.arrivals``. Metrics and their
definitions: ``loadtest.metrics``. Writes ``result.json`` (+ ``records.jsonl`` with
``--save-records``) and ``latency_cdf.png`` / ``throughput.png`` under ``--out``; ``--json``
prints the result on stdout. A live progress line on stderr shows running TTFT/ITL p50.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrelay.loadtest.arrivals import Arrival, ArrivalError, drive, parse_arrival, poisson_times
from kvrelay.loadtest.metrics import SLO, Histogram, RequestRecord, summarize
from kvrelay.loadtest.plan import (
    Fit,
    PlanError,
    SessionPlan,
    count_requests,
    from_trace,
    from_workload,
    with_starts,
)
from kvrelay.loadtest.trace import DEFAULT_BLOCK_SIZE, TraceError, TraceTokens, load_trace
from kvrelay.loadtest.workloads import CONFIGS, WorkloadError, generate

PROGRESS_EVERY_S = 0.5


class Progress:
    """A tqdm bar on stderr with running TTFT / ITL p50 (refreshed at most every 0.5 s)."""

    def __init__(self, total: int | None, label: str, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, dynamic_ncols=True)
        self.ttft, self.itl = Histogram(), Histogram()
        self.errors = 0
        self._shown = 0.0

    def __call__(self, rec: RequestRecord) -> None:
        if rec.ok:
            ttft = rec.ttft_ms()
            if ttft is not None:
                self.ttft.record_ms(ttft)
            for gap in rec.itls_ms():
                self.itl.record_ms(gap)
        else:
            self.errors += 1
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.monotonic()
        if now - self._shown >= PROGRESS_EVERY_S:
            self._shown = now
            p = {"ttft_p50": self.ttft.percentile_ms(50), "itl_p50": self.itl.percentile_ms(50)}
            post = {k: f"{v:.0f}ms" if v is not None else "-" for k, v in p.items()}
            self.bar.set_postfix(post | {"err": self.errors}, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class RunResult:
    records: list[RequestRecord]
    summary: dict[str, Any]
    client: dict[str, Any]


async def execute(client: Any, plans: list[SessionPlan], arrival: Arrival, slo: SLO, *,
                  max_requests: int | None = None, duration_s: float | None = None, pause_scale: float = 1.0,
                  max_inflight: int = 1024, progress: bool = True, label: str = "bench") -> RunResult:
    """Run ``plans`` through ``client`` (an entered HttpClient / NatsClient) and summarize."""
    total = min(count_requests(plans), max_requests) if max_requests else None
    bar = Progress(total if duration_s is None else None, label, progress)
    try:
        d = await drive(client.send, plans, arrival, max_requests=max_requests, duration_s=duration_s,
                        pause_scale=pause_scale, max_inflight=max_inflight, on_record=bar)
    finally:
        bar.close()
    summary = summarize(d.records, slo)
    return RunResult(d.records, summary, {"scheduled": d.scheduled, "late_sends": d.late})


def build_plans(args: argparse.Namespace) -> tuple[list[SessionPlan], Arrival, dict[str, Any]]:
    """Sessions and arrival process from the command line, and how they were made (for the report)."""
    fit = Fit(args.max_context)
    arrival = parse_arrival(args.arrival or ("trace" if args.trace else "concurrency:4"))
    if args.trace:
        records = load_trace(args.trace, args.trace_block_size, limit=args.requests)
        plans = from_trace(records, TraceTokens(args.trace_block_size, args.seed), args.trace_speedup, fit,
                           args.max_output)
        source = {"trace": str(args.trace), "trace_block_size": args.trace_block_size,
                  "trace_speedup": args.trace_speedup, "trace_records": len(records)}
    else:
        if arrival.kind == "trace":
            raise ArrivalError("--arrival trace needs --trace FILE")
        wl = generate(args.workload, args.seed, max_requests=args.requests)
        if arrival.kind == "poisson":
            wl = wl.with_rate(arrival.value)
        plans = from_workload(wl, fit, args.max_output)
        source = {"workload": args.workload, "seed": args.seed, "sessions": len(plans)}
    if args.trace and arrival.kind == "poisson":
        plans = with_starts(plans, poisson_times(len(plans), arrival.value, args.seed))
    source.update(requests_planned=count_requests(plans), prompts_truncated=fit.truncated,
                  requests_dropped_too_long=fit.dropped, max_context=args.max_context,
                  max_output=args.max_output)
    return plans, arrival, source


def conditions() -> dict[str, Any]:
    """Where and when: the client machine (the load average shows a shared machine)."""
    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host_cpus": os.cpu_count(),
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "platform": platform.platform()}


def write_outputs(out: Path, result: dict[str, Any], records: list[RequestRecord], label: str,
                  save_records: bool = False, plots: bool = True) -> list[Path]:
    from kvrelay.loadtest import plots as P

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "result.json"]
    written[0].write_text(json.dumps(result, indent=2) + "\n")
    if save_records:
        p = out / "records.jsonl"
        with p.open("w") as f:
            for r in records:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")
        written.append(p)
    if plots:
        title = f"{label}: {result['summary']['completed']} requests"
        written.append(P.latency_cdfs({label: P.latency_values(records)}, out / "latency_cdf.png", title))
        written.append(P.throughput({label: records}, out / "throughput.png", title))
    return written


def _client(args: argparse.Namespace) -> Any:
    from kvrelay.loadtest.clients import HttpClient, NatsClient

    if args.url:
        return HttpClient(args.url, model=args.model, api=args.api, timeout_s=args.timeout_s,
                          sessions=args.sessions)
    return NatsClient(args.nats_url, namespace=args.namespace, model=args.model or "",
                      timeout_s=args.timeout_s, sessions=args.sessions)


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kvrelay bench run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    tgt = ap.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--url", help="base URL of an OpenAI-compatible server (kvrelay router, vLLM, ...)")
    tgt.add_argument("--nats-url", help="NATS server of a kvrelay deployment (the NATS intake)")
    ap.add_argument("--namespace", default="default", help="kvrelay subject namespace (NATS only)")
    ap.add_argument("--model", default=None, help="model name (HTTP default: the first of /v1/models)")
    ap.add_argument("--api", choices=["completions", "chat"], default="completions",
                    help="HTTP endpoint: completions sends token-id prompts (exact); chat sends text")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--workload", choices=sorted(CONFIGS), default="mix")
    src.add_argument("--trace", type=Path,
                     help="trace file (JSONL: timestamp, input_length, output_length, hash_ids)")
    ap.add_argument("--trace-block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                    help="tokens per trace hash id")
    ap.add_argument("--trace-speedup", type=float, default=1.0,
                    help="replay the trace this many times faster")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arrival", default=None, help="concurrency:N | poisson:SESSIONS_PER_S | trace "
                                                    "(default concurrency:4, or trace with --trace)")
    ap.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    ap.add_argument("--duration", type=float, default=None, help="stop scheduling after this many seconds")
    ap.add_argument("--max-context", type=int, default=None, help="shorten prompts so prompt + output fits")
    ap.add_argument("--max-output", type=int, default=None, help="cap every output at this many tokens")
    ap.add_argument("--pause-scale", type=float, default=1.0, help="multiply think/tool pauses (0 = none)")
    ap.add_argument("--sessions", action="store_true",
                    help="name each request's session (HTTP X-Session-Id / NATS session_id): kvrelay sends a "
                         "session's next step to the decode worker of its last (local prefill)")
    ap.add_argument("--max-inflight", type=int, default=1024, help="client bound on requests in flight")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")
    ap.add_argument("--slo-ttft-ms", type=float, default=None)
    ap.add_argument("--slo-itl-ms", type=float, default=None, help="limit on each request's TPOT (mean ITL)")
    ap.add_argument("--slo-e2e-ms", type=float, default=None)
    ap.add_argument("--label", default="bench")
    ap.add_argument("--out", type=Path, default=None, help="folder for result.json and the plots")
    ap.add_argument("--save-records", action="store_true", help="also write records.jsonl (per request)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    args = ap.parse_args(argv)
    if args.requests is None and args.duration is None:
        args.requests = 100
    for name in ("requests", "duration", "max_context", "max_output", "timeout_s", "max_inflight"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    return args


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    plans, arrival, source = build_plans(args)
    slo = SLO(args.slo_ttft_ms, args.slo_itl_ms, args.slo_e2e_ms)
    cond = conditions()
    async with _client(args) as client:
        target = {"url": args.url, "api": args.api} if args.url else {"nats_url": args.nats_url,
                                                                       "namespace": args.namespace}
        target["model"] = client.model
        res = await execute(client, plans, arrival, slo, max_requests=args.requests, duration_s=args.duration,
                            pause_scale=args.pause_scale, max_inflight=args.max_inflight,
                            progress=not args.no_progress, label=args.label)
    cond.update(target=target, source=source, arrival=arrival.describe(), requests_limit=args.requests,
                duration_limit_s=args.duration, pause_scale=args.pause_scale, send_session_ids=args.sessions,
                loadavg_1m_at_end=round(os.getloadavg()[0], 2))
    result = {"kind": "kvrelay-bench-run", "version": 1, "label": args.label, "conditions": cond,
              "client": res.client, "summary": res.summary}
    if args.out:
        write_outputs(args.out, result, res.records, args.label, args.save_records, not args.no_plots)
    return result


def main(argv: list[str]) -> int:
    args = _args(argv)
    try:
        result = asyncio.run(_main(args))
    except (TraceError, WorkloadError, ArrivalError, PlanError, ValueError) as exc:
        print(f"kvrelay bench run: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"kvrelay bench run: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s = result["summary"]
        print(f"{s['completed']}/{s['requests']} ok in {s['duration_s']}s: TTFT p50 {s['ttft_ms_p50']} ms "
              f"p99 {s['ttft_ms_p99']} ms, ITL p50 {s['itl_ms_p50']} ms p99 {s['itl_ms_p99']} ms, "
              f"{s['output_tok_per_s']} output tok/s, goodput {s['goodput']}, errors {s['errors']}")
    return 0
