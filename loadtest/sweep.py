"""``kvrelay bench compare --sweep-long-rate R [R ...]``: where disaggregation starts to pay.

One ``bench compare`` per long-prompt arrival rate R (everything else from the preset), each
written as its own report (``compare_<preset>_rate_<R>.*``; at the preset's own rate it is the
preset's report, ``compare_<preset>.*``), then one summary across the rates:
``compare_<preset>_sweep.{json,md,png}``. Each row holds both deployments' ITL p50/p99/p99.9,
TTFT p99 and output tokens/s, the two ratios the target is judged on and its verdict, and the
offered prefill load (long-prompt tokens arriving per second). The rates run in the order given;
a deployment that fails at one rate is reported there and the sweep goes on.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

ROW_KEYS = ("ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "itl_ms_p99_9", "itl_ms_max", "output_tok_per_s",
            "goodput", "completed", "requests")


def parse_rates(values: list[str]) -> list[float]:
    """Arrival rates from the command line: positive, finite, no repeats (ValueError otherwise)."""
    rates: list[float] = []
    for v in values:
        try:
            r = float(v)
        except ValueError as exc:
            raise ValueError(f"--sweep-long-rate: {v!r} is not a number") from exc
        if not 0 < r < 1e6:
            raise ValueError(f"--sweep-long-rate: {v!r} must be a positive rate (long prompts per second)")
        if r in rates:
            raise ValueError(f"--sweep-long-rate: {v!r} is given twice")
        rates.append(r)
    if not rates:
        raise ValueError("--sweep-long-rate needs at least one rate")
    return rates


def row(rate: float, report: dict[str, Any]) -> dict[str, Any]:
    """One rate's line of the summary, from its compare report."""
    wl = report["conditions"]["workload"]
    lo, hi = wl["long_prompt"]
    out: dict[str, Any] = {"long_rate": rate, "long_prompt_tokens_per_s": round(rate * (lo + hi) / 2, 1)}
    for name in ("aggregated", "disaggregated", *(n for n in extra_variants() if n in report)):
        block = report.get(name, {})
        if "error" in block:
            out[name] = {"error": block["error"][:300]}
        else:
            out[name] = {k: block.get(k) for k in ROW_KEYS}
        out[name]["long_prompts"] = (block.get("by_kind") or {}).get("long_prompt", {}).get("completed")
    a, d = out["aggregated"], out["disaggregated"]
    if a.get("itl_ms_p99_9") and d.get("itl_ms_p99_9"):
        out["itl_p99_9_ratio"] = round(d["itl_ms_p99_9"] / a["itl_ms_p99_9"], 3)
    out["verdict"] = report.get("verdict", {"evaluated": False, "why": "not judged"})
    out["verdicts"] = {n: v for n, v in (report.get("verdicts") or {}).items() if n != "disaggregated"}
    return out


def extra_variants() -> tuple[str, ...]:
    """The disaggregated deployments beyond ``disaggregated`` (``compare.VARIANTS``)."""
    from kvrelay.loadtest.compare import VARIANTS

    return tuple(n for n in VARIANTS if n != "disaggregated")


def summary(preset: str, description: str, rows: list[dict[str, Any]], cond: dict[str, Any]
            ) -> dict[str, Any]:
    return {"kind": "kvrelay-bench-compare-sweep", "version": 1, "preset": preset,
            "description": description,
            "swept": "long_rate (long prompts per second, Poisson); everything else as the preset",
            "rows": rows, "conditions": cond}


def markdown(s: dict[str, Any]) -> str:
    lines = [f"# bench compare sweep: {s['preset']}", "", s["description"], "",
             f"Swept: {s['swept']}. Ratios are disaggregated / aggregated; the target is ITL p99 ratio "
             "<= 0.5 at throughput ratio >= 0.9.", "",
             "| long prompts/s | prompt tokens/s | ITL p50 agg / dis (ms) | ITL p99 agg / dis (ms) | "
             "ITL p99.9 agg / dis (ms) | TTFT p99 agg / dis (ms) | tok/s agg / dis | ITL p99 ratio | "
             "tput ratio | target |", "|" + "---|" * 10]
    for r in s["rows"]:
        v = r["verdict"]

        def pair(k: str, r: dict[str, Any] = r) -> str:
            return f"{_f(r['aggregated'].get(k))} / {_f(r['disaggregated'].get(k))}"

        met = ("met" if v.get("met") else "NOT met") if v.get("evaluated") else f"- ({v.get('why')})"
        lines.append(f"| {r['long_rate']:g} | {r['long_prompt_tokens_per_s']:g} | {pair('itl_ms_p50')} | "
                     f"{pair('itl_ms_p99')} | {pair('itl_ms_p99_9')} | {pair('ttft_ms_p99')} | "
                     f"{pair('output_tok_per_s')} | {_f(v.get('itl_p99_ratio'))} | "
                     f"{_f(v.get('throughput_ratio'))} | {met} |")
    lines += _variants(s["rows"])
    lines += ["", "## Conditions", "", "```json", json.dumps(s["conditions"], indent=2), "```", ""]
    return "\n".join(lines)


def _variants(rows: list[dict[str, Any]]) -> list[str]:
    """Other disaggregated deployments (e.g. disaggregated-threshold), one line per rate and variant."""
    out = []
    for r in rows:
        for name, v in r.get("verdicts", {}).items():
            b = r.get(name, {})
            met = ("met" if v.get("met") else "NOT met") if v.get("evaluated") else f"- ({v.get('why')})"
            cells = [_f(b.get(k)) for k in ("itl_ms_p50", "itl_ms_p99", "itl_ms_p99_9", "ttft_ms_p99",
                                             "output_tok_per_s")]
            cells += [_f(v.get("itl_p99_ratio")), _f(v.get("throughput_ratio")), met]
            out.append(f"| {r['long_rate']:g} | {name} | " + " | ".join(cells) + " |")
    if not out:
        return []
    head = ("| long prompts/s | deployment | ITL p50 (ms) | ITL p99 (ms) | ITL p99.9 (ms) | TTFT p99 (ms) | "
            "tok/s | ITL p99 ratio | tput ratio | target |")
    return ["", "Other disaggregated deployments (ratios against the same rate's aggregated run):", "", head,
            "|" + "---|" * 10, *out]


def _f(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) and v < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v))


def plot(s: dict[str, Any], path: Path) -> Path:
    from kvrelay.loadtest.plots import pyplot

    plt = pyplot()
    rates = [r["long_rate"] for r in s["rows"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    extra = [n for n in extra_variants() if any(n in r for r in s["rows"])]
    for name, style in (("aggregated", "o-"), ("disaggregated", "s-"), *((n, "^--") for n in extra)):
        panels = ((axes[0], "itl_ms_p99", "ITL p99 (ms)"), (axes[1], "itl_ms_p99_9", "ITL p99.9 (ms)"),
                  (axes[2], "output_tok_per_s", "output tokens/s"))
        for ax, key, label in panels:
            ax.plot(rates, [r.get(name, {}).get(key) for r in s["rows"]], style, label=name)
            ax.set_xlabel("long prompts per second")
            ax.set_ylabel(label)
    for ax in axes[:2]:
        ax.set_yscale("log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{s['preset']}: sweep of the long-prompt rate")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


async def sweep(p: Any, rates: list[float], out: Path, log_dir: Path, progress: bool,
                quiet: tuple[float, float] | None, save_records: bool = False) -> dict[str, Any]:
    """A compare per rate (its own files), then the summary files; the summary."""
    from kvrelay.loadtest.compare import compare

    rows, first_cond = [], None
    for rate in rates:
        q = replace(p, workload=replace(p.workload, long_rate=rate))
        if rate != p.workload.long_rate:  # the preset's own rate is the preset's run, under its name
            q = replace(q, name=f"{p.name}-rate-{rate:g}",
                        description=f"{p.description} [sweep point: long prompts at {rate:g}/s instead]")
        report = await compare(q, out, log_dir / f"rate-{rate:g}", progress, quiet, save_records)
        first_cond = first_cond or report["conditions"]
        rows.append(row(rate, report))
    cond = dict(first_cond or {})
    cond["workload"] = dict(cond.get("workload", {}), long_rate=f"swept: {rates}")
    s = summary(p.name, p.description, rows, cond)
    stem = out / f"compare_{p.name.replace('-', '_')}_sweep"
    stem.with_suffix(".json").write_text(json.dumps(s, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(s))
    s["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md")),
                  str(plot(s, stem.with_suffix(".png")))]
    return s
