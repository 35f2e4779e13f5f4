"""``kvrelay bench tenants``: its pure parts (capacity, backlog intervals, token shares, verdicts);
the benchmark itself runs ``kvrelay up --engine sim`` and is not run here."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytest

from kvrelay.loadtest import bench_tenants as bt
from kvrelay.loadtest.cli import BENCHES
from kvrelay.loadtest.metrics import RequestRecord


def _rec(sent: float, first: float | None, tokens: Sequence[float] = (),
         error: str | None = None) -> RequestRecord:
    r = RequestRecord("r", sent, sent, error=error)
    r.chunks = [(t, 1) for t in ([first] if first is not None else []) + list(tokens)]
    r.end_s = (r.chunks[-1][0] if r.chunks else sent + 0.1)
    return r


def test_bench_tenants_is_registered_and_capacity_follows_the_cost_model() -> None:
    assert BENCHES["tenants"][0] == "kvrelay.loadtest.bench_tenants"
    a = argparse.Namespace(prompt_tokens=350, time_scale=0.5, prefill=2)
    cap = bt.capacity(a)
    assert cap["prefill_s"] == pytest.approx(0.5, rel=0.1)  # 350 tokens at 350 tok/s (+ attention), halved
    assert cap["share_per_s"] == pytest.approx(cap["requests_per_s"] / 2)


def test_bench_tenants_backlogged_intervals_merge_and_skip_turned_away_requests() -> None:
    recs = [_rec(0.0, 2.0), _rec(1.0, 3.0), _rec(5.0, 6.0), _rec(7.0, None, error="http_429"),
            _rec(8.0, None, error="cancelled_at_end")]
    assert bt.backlogged(recs, 0.5, 9.0) == [(0.5, 3.0), (5.0, 6.0), (8.0, 8.1)]
    assert bt.intersect([(0, 3), (5, 6)], [(2, 5.5)]) == [(2, 3), (5, 5.5)]


def test_bench_tenants_shares_count_tokens_only_while_both_tenants_wait() -> None:
    light = [_rec(0.0, 1.0, [1.5, 2.5]), _rec(4.0, 9.0)]  # waiting in [0, 1] and [4, 9]
    flood = [_rec(0.0, 10.0, [10.5])]  # waiting all along
    out = bt.shares({"light": light, "flood": flood}, 0.0, 10.0, {"light": 1.0, "flood": 1.0})
    # both waiting: [0, 1] and [4, 9]: light's tokens at 1.0 and 9.0 count, 1.5 and 2.5 do not
    assert out["both_backlogged_s"] == 6.0 and out["output_tokens"] == {"light": 2, "flood": 0}
    assert out["share"] == {"light": 1.0, "flood": 0.0} and out["share_vs_weight"]["light"] == 2.0


def test_bench_tenants_ttft_summary_and_verdicts() -> None:
    recs = [_rec(0.0, 0.1), _rec(1.0, 1.3), _rec(2.0, None, error="http_429")]
    s = bt.ttft(recs)
    assert s["ok"] == 2 and s["errors"] == {"http_429": 1}
    assert s["ttft_ms_p99"] == pytest.approx(300, rel=0.01)
    result = {"light_solo": {"ttft_ms_p50": 100.0, "ttft_ms_p99": 200.0},
              "light_under_flood": {"ttft_ms_p50": 150.0, "ttft_ms_p99": 280.0},
              "backlogged": {"share_vs_weight": {"light": 0.93, "flood": 1.07}}}
    v = bt.verdicts(result)
    assert v["light_ttft_p99_ratio"] == 1.4 and v["light_ttft_p99_within_1_5x"]
    assert v["light_ttft_p50_ratio"] == 1.5
    assert v["backlogged_share_max_deviation"] == 0.07 and v["backlogged_share_within_10pct"]


def test_bench_tenants_admission_wait_delta_per_tenant() -> None:
    before = {"light": (1.0, 4.0)}
    after = {"light": (1.5, 6.0), "flood": (20.0, 10.0)}
    assert bt.wait_delta(before, after) == {"light": {"waited": 2, "mean_wait_ms": 250.0},
                                            "flood": {"waited": 10, "mean_wait_ms": 2000.0}}
