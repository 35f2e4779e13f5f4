"""The simulated cluster and the scale projection: invariants and hand-computed single requests."""

from __future__ import annotations

import argparse

import pytest

from kvrelay.loadtest.project import Goal, Shape, max_rate, project, requests, shapes, window_tokens
from kvrelay.loadtest.simcluster import Req, SimConfig, Stats, simulate
from kvrelay.workers.sim.cost import CostModel

COST = CostModel.preset("h100-llama70b")


def test_simulate_aggregated_single_request_hand_computed() -> None:
    r = Req(0, arrival=1.0, prompt=1000, output=5)
    st = simulate([r], SimConfig(COST), workers=2)
    prefill = COST.prefill_fixed_s + 1000 / COST.prefill_tokens_per_s
    step = COST.decode_fixed_s + COST.decode_per_seq_s * 1
    assert r.first == pytest.approx(1.0 + prefill)
    assert r.done == pytest.approx(r.first + 4 * step)
    assert st.itl.count == 4  # one gap per token after the first
    assert st.itl.percentile_ms(50) == pytest.approx(step * 1e3, rel=1e-3)


def test_simulate_disaggregated_single_request_adds_transfer_to_second_token() -> None:
    r = Req(0, arrival=0.0, prompt=1000, output=3)
    st = simulate([r], SimConfig(COST), workers=2, prefill=1)
    prefill = COST.prefill_fixed_s + 1000 / COST.prefill_tokens_per_s
    step = COST.decode_fixed_s + COST.decode_per_seq_s
    transfer = COST.transfer_latency_s + 1000 * COST.kv_bytes_per_token / COST.transfer_bytes_per_s
    assert r.first == pytest.approx(prefill)
    assert r.done == pytest.approx(prefill + transfer + 2 * step)
    assert st.itl.count == 2
    assert st.itl.max_ms() == pytest.approx((transfer + step) * 1e3, rel=1e-3)


def test_simulate_chunked_prefill_splits_long_prompt() -> None:
    r = Req(0, 0.0, prompt=1000, output=2)
    simulate([r], SimConfig(COST, chunk_tokens=400), workers=1)
    # three prefill-only forwards (400 + 400 + 200 tokens): the fixed cost is paid three times
    assert r.first == pytest.approx(3 * COST.prefill_fixed_s + 1000 / COST.prefill_tokens_per_s)


@pytest.mark.parametrize("prefill", [0, 1, 2])
def test_simulate_conserves_requests_and_tokens(prefill: int) -> None:
    lengths = [(200 + 37 * i % 3000, 1 + 13 * i % 300) for i in range(300)]
    reqs = requests(lengths, rate=20.0, seed=3)
    st = simulate(reqs, SimConfig(COST, chunk_tokens=2048), workers=4, prefill=prefill)
    assert len(st.finished) == len(reqs) and st.rejected == 0
    for r in reqs:
        assert r.arrival <= r.first <= r.done
        assert r.first - r.arrival >= r.prompt / COST.prefill_tokens_per_s - 1e-9
        if r.output > 1:
            assert (r.done - r.first) / (r.output - 1) >= COST.decode_step_s(1) - 1e-9
    assert st.itl.count == sum(r.output - 1 for r in reqs)


def test_simulate_rejects_kv_that_never_fits() -> None:
    cfg = SimConfig(COST, kv_tokens=1000)
    st = simulate([Req(0, 0.0, 900, 200), Req(1, 0.0, 100, 10)], cfg, workers=1)
    assert st.rejected == 1 and len(st.finished) == 1


def test_simulate_bad_shape() -> None:
    with pytest.raises(ValueError):
        simulate([], SimConfig(COST), workers=2, prefill=2)


def test_shapes_maps_ratios_to_distinct_worker_splits() -> None:
    got = shapes(4, [(1, 3), (1, 2), (1, 1), (2, 1), (3, 1)], [8192, 512])
    assert [s.name for s in got] == ["aggregated (chunk 8192)", "aggregated (chunk 512)",
                                     "disaggregated 1P:3D", "disaggregated 2P:2D", "disaggregated 3P:1D"]
    assert all(1 <= s.prefill < 4 for s in got if s.prefill)


def test_max_rate_meets_goal_and_is_deterministic() -> None:
    lengths = [(1000 + 50 * (i % 20), 50 + 5 * (i % 10)) for i in range(150)]
    goal = Goal(ttft_s=1.0, tpot_s=0.05, attainment=0.9)
    shape = Shape("aggregated (chunk 8192)", 0, 8192)
    a = max_rate(lengths, shape, COST, workers=2, gpus=4, goal=goal, seed=1, start=1.0, steps=4)
    b = max_rate(lengths, shape, COST, workers=2, gpus=4, goal=goal, seed=1, start=1.0, steps=4)
    assert a == b
    assert a["rate_req_per_s"] > 0 and a["attainment"] >= 0.9
    assert a["goodput_req_per_s_per_gpu"] == pytest.approx(a["rate_req_per_s"] / 4, abs=1e-4)


def test_max_rate_impossible_slo_reports_zero() -> None:
    lengths = [(5000, 10)] * 20  # a 5000-token prefill alone is ~0.4 s
    goal = Goal(ttft_s=0.01, tpot_s=1.0, attainment=0.9)
    got = max_rate(lengths, Shape("agg", 0, 8192), COST, 2, 4, goal, seed=0, start=1.0, steps=3)
    assert got["rate_req_per_s"] == 0.0


def test_max_rate_gives_up_doubling_on_a_workload_too_small() -> None:
    lengths = [(100, 5)] * 10
    goal = Goal(ttft_s=100.0, tpot_s=100.0, attainment=0.9)
    got = max_rate(lengths, Shape("agg", 0, 8192), COST, 2, 4, goal, seed=0, start=1.0, steps=2)
    assert "too small" in got["note"] and got["rate_req_per_s"] > 0


def test_project_report_labels_everything_simulated() -> None:
    args = argparse.Namespace(preset="h100-llama70b", gpus=[4], ratios=[(1, 1)], chunks=[8192],
                              workload="cot", requests_per_worker=30, warmup_share=0.1, seed=0,
                              slo_ttft_ms=1000.0, slo_tpot_ms=40.0, attainment=0.9, steps=2)
    rep = project(args)
    assert "SIMULATED" in rep["label"]
    assert rep["cost_model"]["preset"] == "h100-llama70b" and rep["cost_model"]["gpus_per_worker"] == 2
    res = rep["results"]["4_gpus"]
    assert res["workers"] == 2
    assert set(res["shapes"]) == {"aggregated (chunk 8192)", "disaggregated 1P:1D"}
    assert res["best"] in res["shapes"]


def test_window_tokens_spreads_decode_tokens_evenly() -> None:
    st = Stats()
    st.finished = [Req(0, 0.0, 10, 5, first=1.0, done=3.0), Req(1, 0.0, 10, 1, first=2.5, done=2.5)]
    # request 0: its first token at 1.0, then 4 tokens over (1, 3]: half of them by 2.0
    assert window_tokens(st, 0.0, 2.0) == pytest.approx(1 + 2)
    assert window_tokens(st, 2.0, 4.0) == pytest.approx(2 + 1)  # request 1's only token at 2.5


def test_goal_attained_leaves_out_warmup_requests() -> None:
    st = Stats()
    slow = Req(0, 0.0, 10, 2, first=10.0, done=10.1)  # misses the TTFT limit
    fast = [Req(i, 0.0, 10, 2, first=0.1, done=0.2) for i in range(1, 4)]
    st.finished = [slow, *fast]
    goal = Goal(ttft_s=1.0, tpot_s=1.0, attainment=0.9)
    assert goal.attained(st, 4) == pytest.approx(0.75)
    assert goal.attained(st, 4, skip=1) == pytest.approx(1.0)
    assert goal.attained(st, 5, skip=1) == pytest.approx(0.75)  # request 4 never finished: a miss
