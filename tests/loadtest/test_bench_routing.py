"""``kvrelay bench routing`` on a small cluster: the invariants any run must keep (no timing checks)."""

from __future__ import annotations

import json

import pytest

from kvrelay.loadtest import bench_routing
from kvrelay.loadtest.cli import main as bench_main

METRICS = ("prefill_tokens_computed", "cache_hit_rate", "ttft_p50_ms", "ttft_p99_ms", "requests_per_s")


@pytest.fixture(scope="module")
def agentic() -> dict:
    argv = ["--workload", "agentic", "--workers", "4", "--requests", "240", "--seed", "3"]
    args = bench_routing._args(argv)
    return bench_routing.run(args)


def test_bench_routing_reports_every_policy(agentic: dict) -> None:
    assert set(agentic["policies"]) == set(bench_routing.POLICIES)
    for r in agentic["policies"].values():
        assert all(k in r for k in METRICS)
        assert r["requests"] == agentic["requests"] == 240  # every request served, none lost
        computed = r["prefill_tokens_computed"] / r["prompt_tokens"]
        assert r["cache_hit_rate"] == pytest.approx(1 - computed, abs=1e-4)
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]


def test_bench_routing_oracle_computes_the_least(agentic: dict) -> None:
    res = agentic["policies"]
    oracle = res["oracle"]["prefill_tokens_computed"]
    assert all(oracle <= r["prefill_tokens_computed"] for r in res.values())


def test_bench_routing_kv_aware_beats_round_robin_on_agentic(agentic: dict) -> None:
    res = agentic["policies"]
    assert res["kv_aware"]["prefill_tokens_computed"] < res["round_robin"]["prefill_tokens_computed"]
    assert res["kv_aware"]["cache_hit_rate"] > res["round_robin"]["cache_hit_rate"]


def test_bench_routing_kv_aware_index_is_fed_by_worker_events(agentic: dict) -> None:
    index = agentic["policies"]["kv_aware"]["index"]
    assert index["batches"] > 0 and index["applied_batches"] == index["batches"]
    assert index["applied_blocks"] > 0 and "gaps" not in index and "rejected" not in index


def test_bench_routing_same_seed_same_result() -> None:
    argv = ["--workload", "multiturn", "--workers", "3", "--requests", "60",
            "--policies", "kv_aware,least_loaded"]
    a, b = (bench_routing.run(bench_routing._args(argv)) for _ in range(2))
    for p in ("kv_aware", "least_loaded"):
        ra, rb = a["policies"][p], b["policies"][p]
        assert {k: ra[k] for k in METRICS} == {k: rb[k] for k in METRICS}


def test_bench_routing_cli_prints_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    rc = bench_main(["routing", "--workload", "cot", "--workers", "2", "--requests", "30", "--json",
                     "--policies", "round_robin,oracle", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert set(printed["policies"]) == {"round_robin", "oracle"} and printed["targets"] == {}


def test_bench_routing_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        bench_routing._args(["--policies", "random"])
    with pytest.raises(SystemExit):
        bench_routing._args(["--workers", "0"])
