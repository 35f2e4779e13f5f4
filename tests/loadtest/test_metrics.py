"""Metrics arithmetic against hand-computed cases."""

from __future__ import annotations

import pytest

from kvrelay.loadtest.metrics import (
    SLO,
    Histogram,
    RequestRecord,
    errors_by_kind,
    goodput,
    histograms,
    summarize,
    throughput_timeline,
    wall_s,
)


def _close(got: float | None, exact: float) -> bool:
    """HDR reports the top of the value's bucket: exact <= got <= exact * 1.001 (+1 µs)."""
    return got is not None and exact <= got + 1e-9 and got <= exact * 1.001 + 0.001


def _records() -> list[RequestRecord]:
    # A: tokens at 100, 150, 250 (two in one chunk), 300 ms -> TTFT 100, ITL 50/100/0/50, TPOT 50, E2E 300
    a = RequestRecord("a", 0.0, 0.0, chunks=[(0.100, 1), (0.150, 1), (0.250, 2), (0.300, 1)], end_s=0.31,
                      prompt_tokens=10)
    # B: started at 1 s, tokens at 1.5 and 2.0 s -> TTFT 500, ITL 500, TPOT 500, E2E 1000
    b = RequestRecord("b", 1.0, 1.0, chunks=[(1.5, 1), (2.0, 1)], usage_output_tokens=2, end_s=2.01,
                      prompt_tokens=20)
    c = RequestRecord("c", 1.1, 1.1, end_s=1.2, error="http_429")
    return [a, b, c]


def test_record_token_times_repeat_multi_token_chunks() -> None:
    a = _records()[0]
    assert a.token_times() == [0.100, 0.150, 0.250, 0.250, 0.300]
    assert a.output_tokens == 5


def test_record_ttft_itl_tpot_e2e_hand_computed() -> None:
    a, b, _ = _records()
    assert a.ttft_ms() == pytest.approx(100.0)
    assert a.itls_ms() == pytest.approx([50.0, 100.0, 0.0, 50.0])
    assert a.tpot_ms() == pytest.approx(50.0)  # (300 - 100) / (5 - 1)
    assert a.e2e_ms() == pytest.approx(300.0)  # last token, not the stream end
    assert b.ttft_ms() == pytest.approx(500.0)
    assert b.tpot_ms() == pytest.approx(500.0)
    assert b.e2e_ms() == pytest.approx(1000.0)


def test_record_ttft_counts_from_scheduled_not_sent_time() -> None:
    r = RequestRecord("late", scheduled_s=1.0, sent_s=1.4, chunks=[(1.5, 1)])
    assert r.ttft_ms() == pytest.approx(500.0)


def test_record_tpot_uses_usage_count_when_events_are_fewer() -> None:
    # 3 SSE events but the server's usage says 5 tokens (some tokens gave no text)
    r = RequestRecord("u", 0.0, chunks=[(0.1, 1), (0.2, 1), (0.5, 1)], usage_output_tokens=5)
    assert r.tpot_ms() == pytest.approx(100.0)  # (0.5 - 0.1) / 4
    assert r.itls_ms() == pytest.approx([100.0, 300.0])


def test_record_tpot_undefined_for_one_token() -> None:
    r = RequestRecord("one", 0.0, chunks=[(0.2, 1)])
    assert r.tpot_ms() is None and r.itls_ms() == []


def test_record_failed_e2e_ends_at_error() -> None:
    c = _records()[2]
    assert c.ttft_ms() is None
    assert c.e2e_ms() == pytest.approx(100.0)


def test_histogram_percentiles_nearest_rank_within_precision() -> None:
    h = Histogram()
    for v in range(1, 101):
        h.record_ms(float(v))
    assert _close(h.percentile_ms(50), 50.0)
    assert _close(h.percentile_ms(90), 90.0)
    assert _close(h.percentile_ms(99), 99.0)
    assert _close(h.percentile_ms(100), 100.0)
    assert h.mean_ms() == pytest.approx(50.5)
    assert h.count == 100


def test_histogram_percentile_rounding_rule_small_n() -> None:
    h = Histogram()
    for v in (0.0, 50.0, 50.0, 100.0, 500.0):
        h.record_ms(v)
    # rank = max(1, floor(p/100 * 5 + 0.5))
    assert _close(h.percentile_ms(20), 0.0)  # rank 1
    assert _close(h.percentile_ms(50), 50.0)  # rank 3
    assert _close(h.percentile_ms(80), 100.0)  # rank 4
    assert _close(h.percentile_ms(90), 500.0)  # rank 5
    assert _close(h.percentile_ms(99), 500.0)


def test_histogram_sub_millisecond_precision() -> None:
    h = Histogram()
    h.record_ms(123.456)
    assert _close(h.percentile_ms(50), 123.456)


def test_histogram_empty_and_bad_values() -> None:
    h = Histogram()
    assert h.percentile_ms(50) is None and h.mean_ms() is None
    with pytest.raises(ValueError):
        h.record_ms(-1.0)
    with pytest.raises(ValueError):
        h.percentile_ms(101)


def test_histogram_clamps_values_over_an_hour() -> None:
    h = Histogram()
    h.record_ms(5 * 3600 * 1000.0)
    assert h.clamped == 1
    assert _close(h.percentile_ms(50), 3600 * 1000.0)


def test_histograms_pool_itl_over_tokens_and_skip_failures() -> None:
    hs = histograms(_records())
    assert hs["ttft_ms"].count == 2
    assert hs["itl_ms"].count == 5  # 4 gaps of A + 1 of B
    assert _close(hs["itl_ms"].percentile_ms(50), 50.0)  # sorted 0, 50, 50, 100, 500 -> rank 3
    assert _close(hs["itl_ms"].percentile_ms(99), 500.0)


def test_slo_met_needs_success_ttft_and_tpot() -> None:
    a, b, c = _records()
    slo = SLO(ttft_ms=200, itl_ms=100)
    assert slo.met(a) and not slo.met(b) and not slo.met(c)
    assert SLO(ttft_ms=600, itl_ms=600).met(b)
    assert not SLO(ttft_ms=600, itl_ms=400).met(b)  # TPOT 500 > 400
    assert not SLO(e2e_ms=250).met(a) and SLO(e2e_ms=300).met(a)


def test_goodput_counts_failed_requests_as_misses() -> None:
    recs = _records()
    assert goodput(recs, SLO(ttft_ms=200, itl_ms=100)) == pytest.approx(1 / 3)
    assert goodput(recs, SLO()) == pytest.approx(2 / 3)  # no limits: every success
    assert goodput([], SLO()) is None


def test_slo_rejects_non_positive_limits() -> None:
    with pytest.raises(ValueError):
        SLO(ttft_ms=0)
    with pytest.raises(ValueError):
        SLO(itl_ms=-5)


def test_summarize_hand_computed() -> None:
    recs = _records()
    s = summarize(recs, SLO(ttft_ms=200, itl_ms=100))
    assert (s["requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["errors"] == {"http_429": 1}
    assert s["duration_s"] == pytest.approx(2.01)  # scheduled 0.0 -> B's end 2.01
    assert s["output_tokens"] == 7 and s["input_tokens"] == 30
    assert s["output_tok_per_s"] == pytest.approx(7 / 2.01, abs=1e-3)
    assert s["req_per_s"] == pytest.approx(2 / 2.01, abs=1e-4)
    assert s["goodput"] == pytest.approx(0.3333, abs=1e-4)
    assert s["goodput_req_per_s"] == pytest.approx(1 / 2.01, abs=1e-4)
    assert _close(s["ttft_ms_p50"], 100.0) and _close(s["ttft_ms_p99"], 500.0)
    assert _close(s["itl_ms_p50"], 50.0) and _close(s["itl_ms_p99"], 500.0)
    assert _close(s["tpot_ms_p99"], 500.0) and _close(s["e2e_ms_p50"], 300.0)


def test_wall_and_errors_by_kind() -> None:
    recs = _records() + [RequestRecord("d", 0.5, end_s=0.7, error="timeout"),
                         RequestRecord("e", 0.6, end_s=0.8, error="http_429")]
    assert wall_s(recs) == pytest.approx(2.01)
    assert errors_by_kind(recs) == {"http_429": 2, "timeout": 1}
    assert wall_s([]) == 0.0


def test_throughput_timeline_bins_tokens_and_completions() -> None:
    tl = throughput_timeline(_records(), bin_s=1.0)
    # bin 0: A's 5 tokens, A done; bin 1: B's token at 1.5; bin 2: B's token at 2.0, B done
    assert tl == [(0.0, 5.0, 1.0), (1.0, 1.0, 0.0), (2.0, 1.0, 1.0)]
    with pytest.raises(ValueError):
        throughput_timeline(_records(), 0)
