"""``kvrelay bench router`` and the bench dispatcher: a small run prints the promised JSON."""

from __future__ import annotations

import json

import pytest

from kvrelay.loadtest import cli
from kvrelay.loadtest.bench_router import main

KEYS = {"workers", "blocks_indexed", "decision_us_p50", "decision_us_p99", "hash_and_decision_us_p50",
        "events_per_s", "match_us_p50", "index_mb"}


def test_bench_router_small_run_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "4", "--blocks", "2000", "--queries", "50", "--no-dynamo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert KEYS <= set(out)
    assert out["workers"] == 4 and out["blocks_indexed"] >= 2000 and out["events_per_s"] > 0
    assert out["dynamo"] is None and out["dynamo_skipped"] == "--no-dynamo"
    assert "ratio_vs_dynamo" not in out


def test_bench_router_with_dynamo_agrees_on_overlaps(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("dynamo._core", reason="optional dev dependency ai-dynamo-runtime")
    assert main(["--workers", "4", "--blocks", "2000", "--queries", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overlaps_agree_with_dynamo"] == "50/50"
    assert {"ratio_vs_dynamo", "hash_ratio_vs_dynamo", "events_ratio_vs_dynamo"} <= set(out)


def test_bench_router_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "0"]) == 2
    assert "need workers" in capsys.readouterr().err


def test_bench_cli_dispatches_and_lists(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "router" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_bench_router_pins_to_one_core_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    import os

    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    try:
        assert main(["--workers", "2", "--blocks", "500", "--queries", "10", "--no-dynamo",
                     "--pin-cpu", str(cpu), "--json"]) == 0
        assert os.sched_getaffinity(0) == {cpu}
    finally:
        os.sched_setaffinity(0, before)
    out = json.loads(capsys.readouterr().out)
    assert out["machine"]["pinned_cpu"] == cpu and out["index_impl"] in ("native", "python")
    assert main(["--pin-cpu", "100000", "--no-dynamo"]) == 2
