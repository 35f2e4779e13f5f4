"""The trace replay format: good files parse; bad files give a TraceError naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrelay.loadtest.plan import Fit, from_trace
from kvrelay.loadtest.trace import TraceError, TraceTokens, load_trace

GOOD = [
    {"timestamp": 0, "input_length": 1000, "output_length": 20, "hash_ids": [1, 2]},
    {"timestamp": 250, "input_length": 1200, "output_length": 5, "hash_ids": [1, 2, 3]},
    {"timestamp": 250.5, "input_length": 600, "output_length": 7, "hash_ids": [9, 10], "extra": "ignored"},
]


def _write(tmp_path: Path, lines: list[object] | str, name: str = "t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text(lines if isinstance(lines, str) else "".join(
        (x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


def test_load_trace_parses_good_file(tmp_path: Path) -> None:
    recs = load_trace(_write(tmp_path, GOOD))
    assert [r.timestamp_ms for r in recs] == [0.0, 250.0, 250.5]
    assert [r.input_length for r in recs] == [1000, 1200, 600]
    assert recs[1].hash_ids == (1, 2, 3)
    assert [r.line for r in recs] == [1, 2, 3]


def test_load_trace_skips_blank_lines_and_honours_limit(tmp_path: Path) -> None:
    text = "\n" + json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[1]) + "\n" + json.dumps(GOOD[2]) + "\n"
    recs = load_trace(_write(tmp_path, text), limit=2)
    assert [r.line for r in recs] == [2, 4]


def test_trace_tokens_shared_hash_ids_share_prefix(tmp_path: Path) -> None:
    recs = load_trace(_write(tmp_path, GOOD))
    tt = TraceTokens(block_size=512, seed=3)
    a, b, c = (tt.prompt_tokens(r) for r in recs)
    assert (len(a), len(b), len(c)) == (1000, 1200, 600)
    assert a == b[:1000]  # blocks 1 and 2 shared; a's second block is cut at 1000 tokens
    assert b[:1024] != c[:1024]
    assert a[512:1000] == tt.block(2)[: 1000 - 512]
    # deterministic across instances, different across seeds
    assert TraceTokens(512, seed=3).prompt_tokens(recs[1]) == b
    assert TraceTokens(512, seed=4).prompt_tokens(recs[1]) != b


def test_trace_tokens_tail_beyond_hashed_blocks_is_per_request() -> None:
    from kvrelay.loadtest.trace import TraceRecord

    tt = TraceTokens(block_size=4, seed=0, cache_blocks=2)
    r1 = TraceRecord(0, 10, 1, (5,), line=1)
    r2 = TraceRecord(0, 10, 1, (5,), line=2)
    t1, t2 = tt.prompt_tokens(r1), tt.prompt_tokens(r2)
    assert t1[:4] == t2[:4] and t1[4:] != t2[4:]
    assert all(0 <= t < 49152 for t in t1)


def test_from_trace_builds_timed_single_step_sessions(tmp_path: Path) -> None:
    recs = load_trace(_write(tmp_path, GOOD))
    fit = Fit(max_context=1100)
    plans = from_trace(recs, TraceTokens(512), speedup=2.0, fit=fit)
    assert [p.start_s for p in plans] == [0.0, 0.125, 0.12525]
    assert [len(p.steps[0].prompt_token_ids) for p in plans] == [1000, 1095, 600]
    assert fit.truncated == 1


@pytest.mark.parametrize("lines, line, words", [
    ([GOOD[0], {"timestamp": 5, "output_length": 3, "hash_ids": []}], 2, "missing field 'input_length'"),
    ([{"input_length": 5, "output_length": 3, "hash_ids": []}], 1, "missing field 'timestamp'"),
    ([{"timestamp": 0, "input_length": 5, "output_length": 3}], 1, "missing field 'hash_ids'"),
    ([{"timestamp": 0, "input_length": "5", "output_length": 3, "hash_ids": []}], 1, "must be an integer"),
    ([{"timestamp": 0, "input_length": True, "output_length": 3, "hash_ids": []}], 1, "must be an integer"),
    ([{"timestamp": 0, "input_length": 5, "output_length": 0, "hash_ids": []}], 1, "must be >= 1"),
    ([{"timestamp": "soon", "input_length": 5, "output_length": 3, "hash_ids": []}], 1, "timestamp"),
    ([{"timestamp": -1, "input_length": 5, "output_length": 3, "hash_ids": []}], 1, "must be >= 0"),
    ([{"timestamp": 0, "input_length": 5, "output_length": 3, "hash_ids": "1,2"}], 1, "list of integers"),
    ([{"timestamp": 0, "input_length": 5, "output_length": 3, "hash_ids": [1, -2]}], 1, "hash_ids[1]"),
    ([{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2, 3]}], 1,
     "more than its 2 blocks"),
    ([GOOD[1], GOOD[0]], 2, "before the previous line's 250"),
    ([GOOD[0], "{not json"], 2, "not valid JSON"),
    ([GOOD[0], "[1, 2]"], 2, "expected a JSON object"),
])
def test_load_trace_bad_file_names_line(tmp_path: Path, lines: list, line: int, words: str) -> None:
    p = _write(tmp_path, lines)
    with pytest.raises(TraceError) as ei:
        load_trace(p)
    assert ei.value.line == line
    assert f"{p}:{line}:" in str(ei.value)
    assert words in str(ei.value)


def test_load_trace_empty_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no records"):
        load_trace(_write(tmp_path, "\n\n"))


def test_load_trace_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot open"):
        load_trace(tmp_path / "nope.jsonl")


def test_load_trace_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(TraceError, match="UTF-8"):
        load_trace(p)


def test_load_trace_bounds_record_count(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="more than 2 records") as ei:
        load_trace(_write(tmp_path, GOOD), max_records=2)
    assert ei.value.line == 3
