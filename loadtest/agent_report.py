"""``kvrelay bench agent``'s report, pure: step records in, the figures of one variant out.

- ``per_step``: TTFT p50 / p90 and E2E p50 per step index (HDR histograms, ``metrics.py``), TTFT's
  ratio to step 1;
- ``tokens``: prompt tokens sent, cached and computed; with ``reusable`` also what a cache could
  serve at best (the agent's previous request: its prompt and output) and the share of it served;
- ``tool_calls``: the share of answered tool steps whose calls parsed and met their schemas;
- ``targets``: each target with its figure and ``met`` (None when there is no figure);
- ``metric_delta`` / ``kv_bytes``: Prometheus counters after - before, KV bytes moved.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from kvrelay.loadtest.agent_loop import StepRecord
from kvrelay.loadtest.metrics import Histogram

TARGETS = {"ttft_ratio_max": 1.5, "cached_share_min": 0.9, "valid_share_min": 1.0}
KV_BYTES = "kvrelay_kv_bytes_moved_total"
EXAMPLES = 5


def _pct(values: list[float], p: float) -> float | None:
    h = Histogram()
    for v in values:
        h.record_ms(v)
    x = h.percentile_ms(p)
    return None if x is None else round(x, 1)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def per_step(records: list[StepRecord], steps: int) -> dict[str, dict[str, Any]]:
    """TTFT p50 / p90 and E2E p50 of each step index's successful requests, with TTFT's ratio to step 1."""
    out: dict[str, dict[str, Any]] = {}
    for k in range(1, steps + 1):
        ok = [r for r in records if r.step == k and not r.final and r.error is None and r.ttft_ms is not None]
        ttft = [r.ttft_ms for r in ok]
        out[str(k)] = {"n": len(ok), "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p90": _pct(ttft, 90),
                       "e2e_ms_p50": _pct([r.e2e_ms for r in ok if r.e2e_ms is not None], 50)}
    first = out.get("1", {})
    for row in out.values():
        row["ttft_p50_vs_step1"] = _ratio(row["ttft_ms_p50"], first.get("ttft_ms_p50"))
        row["ttft_p90_vs_step1"] = _ratio(row["ttft_ms_p90"], first.get("ttft_ms_p90"))
    return out


def reusable(records: list[StepRecord]) -> dict[tuple[str, int], int]:
    """Per (agent, step): the prompt tokens its agent's previous request already held (its prompt and
    output, at most this prompt): what a cache could serve at best; the rest is new to every cache."""
    by_agent: dict[str, list[StepRecord]] = {}
    for r in records:
        by_agent.setdefault(r.agent, []).append(r)
    out = {}
    for recs in by_agent.values():
        recs.sort(key=lambda r: r.step)
        for prev, cur in zip(recs, recs[1:]):
            if cur.step == prev.step + 1 and prev.prompt_tokens is not None and cur.prompt_tokens is not None:
                held = prev.prompt_tokens + (prev.completion_tokens or 0)
                out[(cur.agent, cur.step)] = min(held, cur.prompt_tokens)
    return out


def tokens(records: list[StepRecord], held: dict[tuple[str, int], int] | None = None) -> dict[str, Any]:
    """Prompt tokens sent, cached and computed (prompt - cached) over the successful requests; with
    ``held`` (``reusable``) also the tokens a cache could have served and the share of them it did."""
    ok = [r for r in records if r.error is None]
    sent = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    out = {"requests": len(ok), "without_usage": sum(r.prompt_tokens is None for r in ok),
           "prompt_tokens": sent, "cached_tokens": cached, "computed_tokens": sent - cached,
           "cached_share": round(cached / sent, 4) if sent else None}
    if held is not None:
        can = sum(held.get((r.agent, r.step), 0) for r in ok)
        out |= {"reusable_tokens": can, "reusable_share": round(can / sent, 4) if sent else None,
                "cached_of_reusable": round(cached / can, 4) if can else None}
    return out


def tool_calls(records: list[StepRecord]) -> dict[str, Any]:
    """Tool-call validity over the tool steps that got an answer (a failed request is an error instead)."""
    steps = [r for r in records if not r.final and r.error is None]
    valid = sum(bool(r.valid) for r in steps)
    examples = Counter(e for r in steps for e in r.invalid[:1])

    def share(n: int) -> float | None:
        return round(n / len(steps), 4) if steps else None

    return {"steps": len(steps), "valid": valid, "valid_share": share(valid),
            "no_call": sum(not r.tool_calls for r in steps),
            "matched_plan_share": share(sum(r.matched_plan for r in steps)),
            "invalid_examples": [f"{n}x {e}" for e, n in examples.most_common(EXAMPLES)]}


def _target(value: float | None, op: str, limit: float) -> dict[str, Any]:
    met = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return {"value": value, "target": f"{op} {limit}", "met": met}


def targets(steps_block: dict[str, dict[str, Any]], later: dict[str, Any], calls: dict[str, Any]) -> dict:
    """The bench's targets, each with its figure and whether it was met (None: no figure)."""
    last = steps_block[max(steps_block, key=int)] if steps_block else {}
    ratio = last.get("ttft_p50_vs_step1")
    return {"last_step_ttft_p50_vs_step1": _target(ratio, "<=", TARGETS["ttft_ratio_max"]),
            "cached_share_after_step1": _target(later.get("cached_share"), ">=", TARGETS["cached_share_min"]),
            "tool_calls_valid_share": _target(calls.get("valid_share"), ">=", TARGETS["valid_share_min"])}


def metric_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` of ``sessions_bench.scrape`` results (component -> metric -> labels -> value)."""
    out: dict[str, Any] = {}
    for comp, metrics in after.items():
        if "error" in metrics or "error" in before.get(comp, {}):
            out[comp] = {"error": metrics.get("error") or before[comp]["error"]}
            continue
        out[comp] = {name: {k: v - before.get(comp, {}).get(name, {}).get(k, 0.0) for k, v in series.items()}
                     for name, series in metrics.items()}
    return out


def kv_bytes(delta: dict[str, Any]) -> float:
    return sum(sum(m.get(KV_BYTES, {}).values()) for m in delta.values() if "error" not in m)


def report_block(records: list[StepRecord], steps: int) -> dict[str, Any]:
    block = per_step(records, steps)
    later = tokens([r for r in records if r.step >= 2], reusable(records))
    calls = tool_calls(records)
    finals = [r for r in records if r.final and r.error is None]
    return {"per_step": block, "final_answer": {"n": len(finals), "ttft_ms_p50": _pct(
                [r.ttft_ms for r in finals if r.ttft_ms is not None], 50)},
            "tokens_step1": tokens([r for r in records if r.step == 1]), "tokens_after_step1": later,
            "tool_calls": calls, "targets": targets(block, later, calls),
            "errors": dict(Counter(r.error for r in records if r.error is not None))}
