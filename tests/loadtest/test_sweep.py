"""``bench compare --sweep-long-rate``: rate parsing, the summary rows, their table, one real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrelay.loadtest.compare import verdict
from kvrelay.loadtest.sweep import markdown, parse_rates, row, summary


def test_sweep_parse_rates_keeps_order_and_refuses_bad_values() -> None:
    assert parse_rates(["0.06", "0.5", "0.12"]) == [0.06, 0.5, 0.12]
    for bad, why in ((["x"], "not a number"), (["0"], "positive"), (["-1"], "positive"),
                     (["nan"], "positive"), (["0.1", "0.10"], "twice"), ([], "at least one")):
        with pytest.raises(ValueError, match=why):
            parse_rates(bad)


def _block(itl99: float, itl999: float, tput: float, longs: int = 3) -> dict:
    return {"ttft_ms_p99": 900.0, "itl_ms_p50": 40.0, "itl_ms_p99": itl99, "itl_ms_p99_9": itl999,
            "itl_ms_max": 2 * itl999, "output_tok_per_s": tput, "goodput": 1.0, "completed": 10,
            "requests": 10, "by_kind": {"long_prompt": {"completed": longs}}}


def _report(rate: float, agg: dict, dis: dict) -> dict:
    return {"conditions": {"workload": {"long_rate": rate, "long_prompt": [1000, 3000]}},
            "aggregated": agg, "disaggregated": dis, "verdict": verdict(agg, dis)}


def test_sweep_row_holds_both_sides_the_ratios_and_the_offered_prefill_load() -> None:
    r = row(0.25, _report(0.25, _block(800.0, 1600.0, 100.0, 45), _block(60.0, 120.0, 95.0, 44)))
    assert r["long_rate"] == 0.25 and r["long_prompt_tokens_per_s"] == 500.0  # 0.25/s x 2000 tokens
    assert r["aggregated"]["itl_ms_p99"] == 800.0 and r["disaggregated"]["output_tok_per_s"] == 95.0
    assert r["aggregated"]["long_prompts"] == 45 and r["disaggregated"]["long_prompts"] == 44
    assert r["itl_p99_9_ratio"] == 0.075
    assert r["verdict"]["met"] and r["verdict"]["itl_p99_ratio"] == 0.075
    assert r["verdict"]["throughput_ratio"] == 0.95


def test_sweep_markdown_has_a_line_per_rate_and_survives_a_failed_deployment() -> None:
    ok = row(0.5, _report(0.5, _block(800.0, 1600.0, 100.0), _block(60.0, 120.0, 95.0)))
    failed = row(0.06, _report(0.06, _block(80.0, 150.0, 100.0), {"error": "kvrelay-up exited with code 1"}))
    assert failed["disaggregated"]["error"].startswith("kvrelay-up") and not failed["verdict"]["evaluated"]
    md = markdown(summary("p", "d", [failed, ok], {"model": "m"}))
    lines = [x for x in md.splitlines() if x.startswith("| 0.")]
    assert len(lines) == 2
    assert lines[0].startswith("| 0.06 | 120 | 40.0 / - |") and "not evaluated" not in lines[0]
    assert "- (a deployment did not run)" in lines[0]
    assert lines[1].endswith("| 0.075 | 0.950 | met |")


def test_sweep_command_line_refuses_a_bad_rate(capsys: pytest.CaptureFixture[str]) -> None:
    from kvrelay.loadtest.compare import main

    with pytest.raises(SystemExit) as exc:
        main(["--preset", "cpu-smoke", "--sweep-long-rate", "0.1", "fast"])
    assert exc.value.code == 2
    assert "'fast' is not a number" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_sweep_runs_one_compare_per_rate_and_writes_the_summary(tmp_path: Path) -> None:
    """Real processes: kvrelay up with the tiny model, twice (one per rate), 6 s of load each."""
    from kvrelay.loadtest.compare import main

    rc = main(["--preset", "cpu-smoke", "--only", "disaggregated", "--duration", "6", "--out", str(tmp_path),
               "--logs", str(tmp_path / "logs"), "--no-progress", "--sweep-long-rate", "0.5", "0.3"])
    s = json.loads((tmp_path / "compare_cpu_smoke_sweep.json").read_text())
    assert rc == 0, s
    assert [r["long_rate"] for r in s["rows"]] == [0.5, 0.3]
    for r in s["rows"]:
        assert r["disaggregated"]["completed"] > 0 and r["disaggregated"]["output_tok_per_s"] > 0
        assert r["verdict"]["evaluated"] is False  # one deployment only: nothing to judge
    per = json.loads((tmp_path / "compare_cpu_smoke_rate_0.5.json").read_text())
    assert per["conditions"]["workload"]["long_rate"] == 0.5 and "long prompts at 0.5/s" in per["description"]
    own = json.loads((tmp_path / "compare_cpu_smoke.json").read_text())  # 0.3 is the preset's own rate
    assert own["preset"] == "cpu-smoke" and own["conditions"]["workload"]["long_rate"] == 0.3
    assert (tmp_path / "compare_cpu_smoke_sweep.png").stat().st_size > 0
    assert (tmp_path / "compare_cpu_smoke_sweep.md").read_text().count("\n| ") == 3  # header + 2 rows


def test_sweep_row_and_markdown_carry_the_other_disaggregated_variants() -> None:
    agg, dis, thr = _block(800.0, 1600.0, 100.0), _block(60.0, 120.0, 95.0), _block(500.0, 900.0, 96.0)
    report = _report(0.5, agg, dis) | {"disaggregated-threshold": thr,
                                        "verdicts": {"disaggregated": verdict(agg, dis),
                                                     "disaggregated-threshold": verdict(agg, thr)}}
    r = row(0.5, report)
    assert r["disaggregated-threshold"]["itl_ms_p99"] == 500.0 and list(r["verdicts"]) == ["disaggregated-threshold"]
    md = markdown(summary("p", "d", [r, row(0.06, _report(0.06, agg, dis))], {"model": "m"}))
    assert "| 0.5 | disaggregated-threshold | 40.0 | 500.0 | 900.0 | 900.0 | 96.0 | 0.625 | 0.960 | NOT met |" in md
    assert md.count("disaggregated-threshold |") == 1  # the rate without it has no line
