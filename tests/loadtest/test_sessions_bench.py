"""``kvrelay bench sessions``: the pure parts (step split, token accounting, metric reading).
The deployments themselves are exercised by the e2e tests of ``kvrelay up``."""

from __future__ import annotations

from kvrelay.loadtest.metrics import SLO, RequestRecord
from kvrelay.loadtest.sessions_bench import VARIANTS, WORKLOAD, block, computed_tokens, samples, step_of
from kvrelay.loadtest.workloads import generate


def _rec(rid: str, prompt: int, cached: int | None, ok: bool = True) -> RequestRecord:
    r = RequestRecord(rid, 0.0, sent_s=0.0, prompt_tokens=prompt, max_tokens=2, cached_tokens=cached,
                      chunks=[(0.1, 1), (0.2, 1)], usage_output_tokens=2, end_s=0.2)
    if not ok:
        r.error, r.error_detail = "timeout", "no answer"
    return r


def test_sessions_bench_step_of_reads_the_step_index_of_a_workload_request() -> None:
    assert step_of(_rec("agentic-t0-3-0", 1, 0)) == 0
    assert step_of(_rec("agentic-t0-3-12", 1, 0)) == 12


def test_sessions_bench_computed_tokens_are_prompt_minus_cached_of_completed_requests() -> None:
    recs = [_rec("s-0", 1000, 0), _rec("s-1", 1200, 992), _rec("s-2", 1400, None), _rec("s-3", 9, 0, ok=False)]
    assert computed_tokens(recs) == {"prompt_tokens": 3600, "cached_tokens": 992, "computed_tokens": 2608}


def test_sessions_bench_block_splits_first_and_later_steps_and_lists_errors() -> None:
    recs = [_rec("s-0", 1000, 0), _rec("s-1", 1200, 992), _rec("s-2", 1400, 1184), _rec("t-0", 50, 0, ok=False)]
    b = block(recs, SLO())
    assert b["first_steps"]["requests"] == 2 and b["first_steps"]["completed"] == 1
    assert b["later_steps"]["requests"] == 2
    assert b["later_steps_tokens"]["computed_tokens"] == 1200 - 992 + 1400 - 1184
    assert b["errors"] == ["timeout: no answer"]


def test_sessions_bench_samples_sums_a_metric_by_labels() -> None:
    text = ("# TYPE kvrelay_router_local_prefill_total counter\n"
            'kvrelay_router_local_prefill_total{reason="decode_affinity",outcome="accepted"} 3.0\n'
            'kvrelay_router_local_prefill_total{reason="decode_cache",outcome="overloaded"} 1.0\n'
            "# TYPE kvrelay_kv_bytes_moved_total counter\nkvrelay_kv_bytes_moved_total 4096.0\n")
    assert samples(text, "kvrelay_router_local_prefill_total") == {
        "outcome=accepted,reason=decode_affinity": 3.0, "outcome=overloaded,reason=decode_cache": 1.0}
    assert samples(text, "kvrelay_kv_bytes_moved_total") == {"": 4096.0}
    assert samples(text, "kvrelay_absent_total") == {}


def test_sessions_bench_variants_differ_only_in_local_prefill_and_the_workload_is_multi_step() -> None:
    assert VARIANTS == {"transfer": ("router.kv_local_prefill=false",), "local": ("router.kv_local_prefill=true",),
                        "local-chunked": ("router.kv_local_prefill=true", "decode.prefill_chunk_tokens=64")}
    wl = generate("agentic", 0, WORKLOAD)
    assert all(len(s.steps) >= 4 for s in wl.sessions)
