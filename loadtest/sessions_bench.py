"""``kvrelay bench sessions``: multi-step agents with and without decode affinity, on real engines.

    kvrelay bench sessions --json --out loadtest/results

Starts ``kvrelay up`` (P prefill + D decode workers, kv_aware routing, engines pinned to their
cores) once per variant and runs the same seeded agentic workload through the HTTP API, the client
naming each request's session (``X-Session-Id``) in both:

- ``transfer``: ``router.kv_local_prefill=false``: every step is prefilled on a prefill worker
  (its prefix cache computes only the new suffix), its KV exported, pulled and read by a decode worker;
- ``local``: ``router.kv_local_prefill=true`` (the default): a session's next step goes to the
  decode worker that ran its last one, which prefills the suffix itself; no export, no transfer;
- ``local-chunked`` (ask for it with ``--variants``): ``local`` with ``decode.prefill_chunk_tokens=64``:
  the decode engine computes at most 64 prompt tokens a step, so a local prefill is spread over
  several decode steps instead of stalling the other streams for one long one.

Per variant: TTFT / ITL / end-to-end percentiles for all requests, first steps and later steps;
output tokens/s; prompt tokens computed (prompt - cached, from each response's usage); and from
the components' Prometheus metrics: local prefills by outcome, KV bytes moved, decode prompt
tokens computed locally. Writes ``sessions_<model>.json``; ``--json`` prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvrelay.loadtest import interference
from kvrelay.loadtest.arrivals import Arrival
from kvrelay.loadtest.deployments import DeploymentError, Disaggregated, EngineSettings, free_port
from kvrelay.loadtest.metrics import SLO, RequestRecord, summarize
from kvrelay.loadtest.plan import from_workload
from kvrelay.loadtest.run import conditions, execute
from kvrelay.loadtest.workloads import AgenticConfig, generate

VARIANTS = {"transfer": ("router.kv_local_prefill=false",), "local": ("router.kv_local_prefill=true",),
            # local prefill spread over decode steps of at most 64 prompt tokens (decode.prefill_chunk_tokens)
            "local-chunked": ("router.kv_local_prefill=true", "decode.prefill_chunk_tokens=64")}
# an agent loop sized for SmolLM2 on 2 CPU cores: the suffix a step adds (the previous tool call
# and a tool result) stays under the default local threshold (256 tokens) most of the time
WORKLOAD = AgenticConfig(sessions=8, tenants=1, pool=1, system_tokens=(600, 1000), task_tokens=(50, 150),
                         steps=(4, 6), output_tokens=(16, 40), tool_result_tokens=(60, 180),
                         tool_pause_s=(0.2, 1.0))
SUMMARY_KEYS = ("requests", "completed", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
                "e2e_ms_p50", "e2e_ms_p99", "output_tok_per_s")
METRICS = {  # component -> (metric, labels) to read after the run
    "router": [("kvrelay_router_local_prefill_total", {}), ("kvrelay_router_session_lookups_total", {})],
    "decode": [("kvrelay_kv_bytes_moved_total", {}), ("kvrelay_decode_local_prompt_tokens_total", {}),
               ("kvrelay_decode_kv_recomputed_total", {})],
    "prefill": [("kvrelay_prefill_requests_total", {})],
}


def step_of(rec: RequestRecord) -> int:
    """The step index of a workload request (``<session>-<step>``)."""
    return int(rec.request_id.rsplit("-", 1)[1])


def computed_tokens(records: list[RequestRecord]) -> dict[str, int]:
    """Prompt tokens sent and computed (prompt - cached, as each response's usage says)."""
    ok = [r for r in records if r.ok]
    sent = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    return {"prompt_tokens": sent, "cached_tokens": cached, "computed_tokens": sent - cached}


def samples(text: str, name: str) -> dict[str, float]:
    """Every sample of metric ``name`` in Prometheus text, keyed by its labels (``a=x,b=y``)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                key = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[key] = out.get(key, 0.0) + s.value
    return out


async def scrape(urls: dict[str, str]) -> dict[str, Any]:
    import aiohttp

    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for comp, url in urls.items():
            try:
                async with s.get(url) as r:
                    text = await r.text()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                out[comp] = {"error": repr(exc)}
                continue
            out[comp] = {name: samples(text, name) for name, _ in METRICS[comp]}
    return out


def block(records: list[RequestRecord], slo: SLO) -> dict[str, Any]:
    def short(recs: list[RequestRecord]) -> dict[str, Any]:
        s = summarize(recs, slo) if recs else {}
        return {k: s.get(k) for k in SUMMARY_KEYS}

    later = [r for r in records if step_of(r) > 0]
    return {"all": short(records), "first_steps": short([r for r in records if step_of(r) == 0]),
            "later_steps": short(later), "later_steps_tokens": computed_tokens(later),
            "tokens": computed_tokens(records),
            "errors": sorted({f"{r.error}: {r.error_detail[:120]}" for r in records if not r.ok})}


async def run_variant(name: str, args: argparse.Namespace, engine: EngineSettings, log_dir: Path) -> dict:
    from kvrelay.loadtest.clients import HttpClient

    ports = {"prefill": free_port(), "decode": free_port()}
    sets = (*VARIANTS[name], f"prefill.metrics_port={ports['prefill']}", f"decode.metrics_port={ports['decode']}")
    dep = Disaggregated(engine, log_dir / name, prefill=1, decode=1, sets=sets, startup_timeout_s=600.0)
    plans = from_workload(generate("agentic", args.seed, WORKLOAD), max_output=None)
    slo = SLO(ttft_ms=args.slo_ttft_ms, itl_ms=None)
    out: dict[str, Any] = {"sets": list(VARIANTS[name])}
    try:
        url = await dep.start()
        print(f"kvrelay bench sessions: {name} is up at {url} ({dep.started_s:.0f}s)", file=sys.stderr)
        async with HttpClient(url, timeout_s=args.timeout_s, sessions=True) as client:
            out["warmup_errors"] = sum(not r.ok for r in await interference.warmup(client.send, 2))
            t0 = time.monotonic()
            res = await execute(client, plans, Arrival("concurrency", args.concurrency), slo,
                                progress=not args.no_progress, label=name)
            out["wall_s"] = round(time.monotonic() - t0, 1)
        out |= block(res.records, slo)
        urls = {"router": f"{url}/metrics", **{k: f"http://127.0.0.1:{p}/metrics" for k, p in ports.items()}}
        out["metrics"] = await scrape(urls)
    except DeploymentError as exc:
        out["error"] = str(exc)[-4000:]
    finally:
        await dep.stop()
    out["deployment"] = dep.describe()
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    engine = EngineSettings(model=args.model)
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="kvrelay-sessions-"))
    report: dict[str, Any] = {
        "kind": "kvrelay-bench-sessions", "version": 1, "model": args.model,
        "conditions": conditions() | {"workload": {"kind": "agentic", "seed": args.seed, **_cfg()},
                                      "arrival": f"{args.concurrency} concurrent sessions (closed loop)",
                                      "client": "HTTP /v1/completions, token-id prompts, X-Session-Id, "
                                                "temperature 0, ignore_eos", "logs": str(log_dir)}}
    for name in args.variants:
        report[name] = await run_variant(name, args, engine, log_dir)
    return report


def _cfg() -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(WORKLOAD)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvrelay bench sessions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="kvrelay model name or folder")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["transfer", "local"])
    ap.add_argument("--concurrency", type=int, default=2, help="sessions in flight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=5000.0)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    ap.add_argument("--out", type=Path, default=None, help="folder for sessions_<model>.json")
    ap.add_argument("--logs", type=Path, default=None, help="folder for the deployments' logs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.concurrency < 1:
        ap.error("--concurrency must be >= 1")
    report = asyncio.run(bench(args))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"sessions_{Path(args.model).name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else json.dumps({k: report[k].get("later_steps")
                                                                     for k in args.variants}, indent=2))
    return 1 if any("error" in report[k] for k in args.variants) else 0
