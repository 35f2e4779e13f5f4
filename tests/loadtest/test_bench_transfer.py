"""``kvrelay bench transfer``: the report's shape on a tiny run; a clear exit where a backend is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrelay.loadtest import bench_transfer
from kvrelay.transport.kv.fetch import available


def test_bench_transfer_tiny_run_reports_every_field(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.json"
    rc = bench_transfer.main(
        [
            "--backend",
            "shm",
            "tcp",
            "--tokens",
            "64",
            "--repeats",
            "2",
            "--checksum",
            "--json",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert [b["backend"] for b in report["backends"]] == ["shm", "tcp"]
    for b in report["backends"]:
        (row,) = b["results"]
        assert row["tokens"] == 64 and row["blocks"] == 2 and row["bytes"] == 2 * 30 * 12288 * 2
        for key in ("gb_per_s", "p50_ms", "p99_ms", "baseline_gb_per_s", "ratio", "export_copy_gb_per_s"):
            assert row[key] > 0, key
        assert row["p99_ms"] >= row["p50_ms"]
        assert row["ratio"] == pytest.approx(row["gb_per_s"] / row["baseline_gb_per_s"], rel=0.02)


@pytest.mark.skipif(available("cuda-ipc")[0], reason="cuda-ipc is available here")
def test_bench_transfer_unavailable_backend_exits_2(capsys) -> None:
    assert bench_transfer.main(["--backend", "cuda-ipc", "--json"]) == 2
    assert "cuda-ipc not available here: " in capsys.readouterr().err
