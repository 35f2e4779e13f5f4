"""``kvrelay bench compare``: the same workload against deployments it starts itself; one report.

    kvrelay bench compare --preset cpu-interference --json --out loadtest/results

For each deployment of the preset (``aggregated``: plain vLLM servers behind a least-outstanding
proxy; ``disaggregated``: ``kvrelay up`` with prefill and decode workers; same engines, same
cores, see ``deployments.py``): start it, send warm-up requests (not measured), run the preset's
seeded workload through the HTTP API, stop it. Writes ``compare_<preset>.json`` (keys
``aggregated`` and ``disaggregated``, each with ``ttft_ms_p50``, ``ttft_ms_p99``, ``itl_ms_p50``,
``itl_ms_p99``, ``output_tok_per_s``, ``goodput`` and the rest of ``metrics.summarize``, plus the
conditions), ``compare_<preset>.md`` (a side-by-side table) and two PNGs (latency CDFs,
throughput over time). ``--json`` prints the JSON on stdout. A deployment that fails to start
is reported with its error (and the exit code is 1); nothing is made up for it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvrelay.loadtest import interference
from kvrelay.loadtest.cpuwatch import CpuWatch, wait_quiet
from kvrelay.loadtest.deployments import (
    Aggregated,
    Deployment,
    DeploymentError,
    Disaggregated,
    EngineSettings,
)
from kvrelay.loadtest.interference import InterferenceWorkload
from kvrelay.loadtest.metrics import SLO, RequestRecord, summarize
from kvrelay.loadtest.run import Progress, conditions

# the disaggregated deployments: kvrelay settings each adds (after the preset's and --set). kvrelay's
# default P/D decider is "adaptive" (router/pd_decider.py); ``disaggregated-threshold`` runs the load-blind
# rule it replaced, for a comparison on the same machine (ask for it with --only)
VARIANTS: dict[str, tuple[str, ...]] = {"disaggregated": (),
                                        "disaggregated-threshold": ('router.pd_decider="threshold"',)}
NAMES = ("aggregated", *VARIANTS)
KEYS = ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "output_tok_per_s", "goodput")
TARGET_ITL_RATIO = 0.5  # disaggregated ITL p99 <= 0.5 x aggregated
TARGET_TPUT_LOSS = 0.10  # at no more than 10 % lower output throughput


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    engine: EngineSettings
    workload: InterferenceWorkload
    slo: SLO
    deployments: tuple[str, ...] = ("aggregated", "disaggregated")
    cores: int = 2  # engines in each deployment (one core each)
    policy: str = "kv_aware"
    warmup_requests: int = 4
    timeout_s: float = 300.0  # per request (bounds the drain after the load stops)
    aggregated_instances: int = 0  # plain vLLM servers (0: one per core)
    judged: bool = True  # the interference target (verdict) applies to this preset
    load_on_prefill_cores: bool = True  # disaggregated: decode.kv_load_cpus = the prefill cores
    kvrelay_sets: tuple[str, ...] = ()  # disaggregated: more ``kvrelay up --set key=value``


PRESETS: dict[str, Preset] = {
    "cpu-interference": Preset(
        "cpu-interference",
        "SmolLM2-135M on 2 cores: 8 long-output streams (200-400 tokens from 64-192-token prompts) while "
        "1500-3000-token prompts arrive (Poisson, 0.06/s), 180 s of load per deployment",
        EngineSettings(), InterferenceWorkload(), SLO(ttft_ms=10_000, itl_ms=150), timeout_s=150.0),
    "cpu-single": Preset(
        "cpu-single",
        "SmolLM2-135M, one request at a time (400-600-token prompts, 64 output tokens), 90 s of load: one "
        "plain vLLM instance on one core vs kvrelay 1 prefill + 1 decode worker (one core each); not a "
        "same-hardware comparison: what one request sees, and the time from start to the first answer",
        EngineSettings(), InterferenceWorkload(decoders=1, decode_prompt=(400, 600), decode_output=(64, 64),
                                               long_rate=0.0, duration_s=90.0),
        SLO(ttft_ms=5000, itl_ms=150), aggregated_instances=1, judged=False),
    "cpu-smoke": Preset(
        "cpu-smoke", "a 20 s check of the whole path with the tiny random model (numbers mean nothing)",
        EngineSettings(model="tiny", max_model_len=2048), InterferenceWorkload(
            decoders=2, decode_output=(20, 40), long_rate=0.3, long_prompt=(300, 600), duration_s=20.0),
        SLO(ttft_ms=5000, itl_ms=500), warmup_requests=2),
}


def make(name: str, p: Preset, log_dir: Path) -> Deployment:
    start = {"startup_timeout_s": 600.0}
    if name == "aggregated":
        return Aggregated(p.engine, log_dir / name, instances=p.aggregated_instances or p.cores, **start)
    if name in VARIANTS:
        half = max(1, p.cores // 2)
        dep = Disaggregated(p.engine, log_dir / name, prefill=half, decode=max(1, p.cores - half),
                            policy=p.policy, load_on_prefill_cores=p.load_on_prefill_cores,
                            sets=(*p.kvrelay_sets, *VARIANTS[name]), **start)
        dep.name = name
        return dep
    raise ValueError(f"unknown deployment {name!r}: {', '.join(NAMES)}")


@dataclass
class Outcome:
    name: str
    records: list[RequestRecord] = field(default_factory=list)
    block: dict[str, Any] = field(default_factory=dict)
    first_answer_s: float | None = None  # from the deployment's launch to its first complete answer


async def measure(dep: Deployment, p: Preset, progress: bool, quiet: tuple[float, float] | None) -> Outcome:
    """Start, warm up, (wait for a quiet machine,) run the workload, stop. Errors -> ``error``."""
    from kvrelay.loadtest.clients import HttpClient

    out = Outcome(dep.name)
    load0 = os.getloadavg()[0]
    machine: dict[str, Any] = {}
    try:
        url = await dep.start()
        print(f"kvrelay bench compare: {dep.name} is up at {url} ({dep.started_s:.0f}s)", file=sys.stderr)
        async with HttpClient(url, timeout_s=p.timeout_s) as client:
            warm = await interference.warmup(client.send, p.warmup_requests)
            if warm and warm[0].ok and warm[0].end_s is not None:  # start to the first answer
                out.first_answer_s = dep.started_s + warm[0].end_s - warm[0].scheduled_s
            if quiet is not None:
                machine["wait_quiet"] = await wait_quiet(*quiet)
            bar = Progress(None, dep.name, progress)
            watch = CpuWatch()
            watch.start()
            try:
                out.records, counters = await interference.run(client.send, p.workload, bar)
            finally:
                bar.close()
                machine["during_run"] = watch.stop()
        out.block = summarize(out.records, p.slo)
        out.block["by_kind"] = {k: _short(summarize([r for r in out.records if r.kind == k], p.slo))
                                for k in ("decode", "long_prompt")}
        out.block["client"] = counters | {"warmup_errors": sum(1 for r in warm if not r.ok)}
    except DeploymentError as exc:
        out.block = {"error": str(exc)[-4000:]}
    finally:
        await dep.stop()
    out.block["deployment"] = dep.describe()
    out.block["first_answer_s"] = None if out.first_answer_s is None else round(out.first_answer_s, 1)
    out.block["loadavg_1m"] = {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)}
    out.block["machine"] = machine
    return out


def _short(s: dict[str, Any]) -> dict[str, Any]:
    keep = ("requests", "completed", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "itl_ms_max",
            "tpot_ms_p50", "tpot_ms_p99", "output_tokens", "goodput")
    return {k: s.get(k) for k in keep}


def verdict(agg: dict[str, Any], dis: dict[str, Any]) -> dict[str, Any]:
    """The issue's target: disaggregated ITL p99 <= 0.5 x aggregated at <= 10 % throughput loss."""
    if "error" in agg or "error" in dis:
        return {"evaluated": False, "why": "a deployment did not run"}
    a_itl, d_itl = agg.get("itl_ms_p99"), dis.get("itl_ms_p99")
    a_tp, d_tp = agg.get("output_tok_per_s"), dis.get("output_tok_per_s")
    if not (a_itl and d_itl and a_tp and d_tp):
        return {"evaluated": False, "why": "missing figures"}
    itl_ratio, tput_ratio = d_itl / a_itl, d_tp / a_tp
    return {"evaluated": True, "itl_p99_ratio": round(itl_ratio, 3), "throughput_ratio": round(tput_ratio, 3),
            "itl_target": f"<= {TARGET_ITL_RATIO}", "throughput_target": f">= {1 - TARGET_TPUT_LOSS}",
            "itl_met": itl_ratio <= TARGET_ITL_RATIO, "throughput_met": tput_ratio >= 1 - TARGET_TPUT_LOSS,
            "met": itl_ratio <= TARGET_ITL_RATIO and tput_ratio >= 1 - TARGET_TPUT_LOSS}


def markdown(report: dict[str, Any]) -> str:
    names = [n for n in NAMES if n in report]
    rows = [("TTFT p50 (ms)", "ttft_ms_p50"), ("TTFT p99 (ms)", "ttft_ms_p99"),
            ("ITL p50 (ms)", "itl_ms_p50"), ("ITL p99 (ms)", "itl_ms_p99"),
            ("ITL p99.9 (ms)", "itl_ms_p99_9"), ("ITL max (ms)", "itl_ms_max"),
            ("TPOT p99 (ms)", "tpot_ms_p99"), ("E2E p99 (ms)", "e2e_ms_p99"),
            ("output tokens/s", "output_tok_per_s"), ("requests/s", "req_per_s"), ("goodput", "goodput"),
            ("requests (ok/all)", None), ("errors", "errors"), ("start to first answer (s)", "first_answer_s"),
            ("CPU used by other processes during the run", "external")]
    lines = [f"# bench compare: {report['preset']}", "", report["description"], "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in rows:
        cells = []
        for n in names:
            b = report[n]
            if "error" in b:
                cells.append("did not run")
            elif key is None:
                cells.append(f"{b.get('completed')}/{b.get('requests')}")
            elif key == "external":
                share = (b.get("machine") or {}).get("during_run", {}).get("external_cpu_share")
                cells.append("-" if share is None else f"{share * 100:.0f} % of the machine")
            else:
                cells.append(_fmt(b.get(key)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _by_kind(report, names)
    verdicts = report.get("verdicts") or ({"disaggregated": report["verdict"]} if "verdict" in report else {})
    for name, v in verdicts.items():
        if v.get("evaluated"):
            outcome = (f"ITL p99 ratio {v['itl_p99_ratio']}, throughput ratio {v['throughput_ratio']} -> "
                       f"{'met' if v['met'] else 'NOT met'}")
        else:
            outcome = f"not evaluated ({v.get('why')})"
        lines += ["", f"Target ({name} ITL p99 <= 0.5x aggregated, throughput >= 0.9x): {outcome}"]
    lines += ["", "## Conditions", "", "```json", json.dumps(report["conditions"], indent=2), "```", ""]
    for n in names:
        b = report[n]
        lines += [f"**{n}**: " + (f"did not run: `{b['error'][:300]}`" if "error" in b else
                                  json.dumps(b.get("deployment", {}), indent=None)), ""]
    return "\n".join(lines)


def _by_kind(report: dict[str, Any], names: list[str]) -> list[str]:
    """A second table: the same figures per request kind (decode streams, long prompts)."""
    ran = [n for n in names if "by_kind" in report[n]]
    if not ran:
        return []
    cols = [("TTFT p50", "ttft_ms_p50"), ("TTFT p99", "ttft_ms_p99"), ("ITL p99", "itl_ms_p99"),
            ("ITL max", "itl_ms_max"), ("TPOT p99", "tpot_ms_p99"), ("goodput", "goodput")]
    head = "| deployment | kind | requests | " + " | ".join(c for c, _ in cols) + " |"
    out = ["", "By request kind (ms):", "", head, "|---|---|---|" + "---|" * len(cols)]
    for n in ran:
        for kind, b in report[n]["by_kind"].items():
            cells = [_fmt(b.get(k)) for _, k in cols]
            count = f"{b.get('completed')}/{b.get('requests')}"
            out.append(f"| {n} | {kind} | {count} | " + " | ".join(cells) + " |")
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v) if not isinstance(v, dict) else (json.dumps(v) if v else "none")


def write(report: dict[str, Any], outcomes: list[Outcome], out: Path, plots: bool,
          save_records: bool = False) -> list[Path]:
    from kvrelay.loadtest import plots as P

    out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_{report['preset'].replace('-', '_')}"
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    ran = [o for o in outcomes if o.records]
    if save_records:
        for o in ran:
            paths.append(out / f"{stem}_{o.name}_records.jsonl")
            paths[-1].write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in o.records))
    if plots and ran:
        c = report["conditions"]
        title = f"{report['preset']}: {c['model']} on {c['cores']} cores"
        paths.append(P.latency_cdfs({o.name: P.latency_values(o.records) for o in ran},
                                    out / f"{stem}_latency_cdf.png", title))
        paths.append(P.throughput({o.name: o.records for o in ran}, out / f"{stem}_throughput.png", title,
                                  10.0))
    return paths


async def compare(p: Preset, out: Path, log_dir: Path, progress: bool,
                  quiet: tuple[float, float] | None = None, save_records: bool = False) -> dict[str, Any]:
    cond = conditions() | {"preset": p.name, "model": p.engine.model, "cores": p.cores,
                           "workload": p.workload.describe(), "slo": p.slo.to_dict(),
                           "client": "kvrelay bench HTTP client, /v1/completions with token-id prompts, "
                                     "streaming with usage, temperature 0, ignore_eos",
                           "itl_definition": "gaps between consecutive token arrivals, pooled over tokens "
                                             "(loadtest/metrics.py)", "logs": str(log_dir),
                           "decode_kv_loader_on_prefill_cores": p.load_on_prefill_cores}
    report: dict[str, Any] = {"kind": "kvrelay-bench-compare", "version": 1, "preset": p.name,
                              "description": p.description, "conditions": cond}
    outcomes = []
    t0 = time.monotonic()
    for name in p.deployments:
        o = await measure(make(name, p, log_dir), p, progress, quiet)
        outcomes.append(o)
        report[name] = o.block
    cond["wall_s"] = round(time.monotonic() - t0, 1)
    if p.judged and "aggregated" in report:
        verdicts = {n: verdict(report["aggregated"], report[n]) for n in VARIANTS if n in report}
        if "disaggregated" in verdicts:
            report["verdict"] = verdicts["disaggregated"]
        if verdicts:
            report["verdicts"] = verdicts
    report["files"] = [str(x) for x in write(report, outcomes, out, True, save_records)]
    return report


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvrelay bench compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-interference")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the report and plots")
    ap.add_argument("--logs", type=Path, default=None,
                    help="folder for the deployments' logs (default: a temp dir)")
    ap.add_argument("--only", choices=list(NAMES), action="append", default=None,
                    help="run only this deployment (repeatable, in the order given); "
                         "disaggregated-threshold: kvrelay with router.pd_decider=\"threshold\"")
    ap.add_argument("--duration", type=float, default=None, help="override the preset's seconds of load")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--wait-quiet", type=float, default=None, metavar="SHARE",
                    help="before each run, wait until other processes use at most this share of the CPU "
                         "(e.g. 0.1; a shared machine skews the numbers); see --wait-quiet-max-s")
    ap.add_argument("--wait-quiet-max-s", type=float, default=180.0)
    ap.add_argument("--json", action="store_true", help="print the side-by-side JSON on stdout")
    ap.add_argument("--load-on-decode-core", action="store_true",
                    help="disaggregated: leave the decode workers' KV loader threads on their own core "
                         "(default: on the prefill cores, decode.kv_load_cpus)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="disaggregated: one more kvrelay setting (repeatable, after the preset's own), "
                         "e.g. prefill.long_prompt_step_tokens=256; recorded in the report")
    ap.add_argument("--sweep-long-rate", nargs="+", default=None, metavar="R",
                    help="run the comparison once per long-prompt rate R (per second) and write a summary "
                         "across them (compare_<preset>_sweep.*): where disaggregation starts to pay")
    ap.add_argument("--save-records", action="store_true",
                    help="also write every request's record (token arrival times) as JSON lines, "
                         "one file per deployment")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    rates = None
    if args.sweep_long_rate is not None:
        from kvrelay.loadtest import sweep

        try:
            rates = sweep.parse_rates(args.sweep_long_rate)
        except ValueError as exc:
            ap.error(str(exc))
    p = PRESETS[args.preset]
    wl = p.workload
    if args.duration is not None:
        wl = replace(wl, duration_s=args.duration)
    if args.seed is not None:
        wl = replace(wl, seed=args.seed)
    p = replace(p, workload=wl, deployments=tuple(args.only) if args.only else p.deployments,
                load_on_prefill_cores=p.load_on_prefill_cores and not args.load_on_decode_core,
                kvrelay_sets=(*p.kvrelay_sets, *args.sets))
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="kvrelay-compare-"))
    quiet = None if args.wait_quiet is None else (args.wait_quiet, args.wait_quiet_max_s)
    if rates is not None:
        s = asyncio.run(sweep.sweep(p, rates, args.out, log_dir, not args.no_progress, quiet,
                                    args.save_records))
        print(json.dumps(s, indent=2) if args.json else sweep.markdown(s))
        return 1 if any("error" in r.get(n, {}) for r in s["rows"] for n in p.deployments) else 0
    report = asyncio.run(compare(p, args.out, log_dir, not args.no_progress, quiet, args.save_records))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
    return 1 if any("error" in report.get(n, {}) for n in p.deployments) else 0

