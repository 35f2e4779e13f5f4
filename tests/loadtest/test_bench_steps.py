"""``kvrelay bench steps``: argument checks, and one real run with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrelay.loadtest.bench_steps import main


@pytest.mark.parametrize("argv, why", [(["--batch", "0"], ">= 1"), (["--steps", "0"], ">= 1"),
                                       (["--prefill-tokens", "0"], "--prefill-tokens"),
                                       (["--core", "4096"], "not a core")])
def test_bench_steps_refuses_bad_arguments(argv: list[str], why: str) -> None:
    with pytest.raises(SystemExit, match=why):
        main(argv)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_bench_steps_measures_each_dtype_in_a_pinned_engine(tmp_path: Path) -> None:
    out = tmp_path / "steps.json"
    rc = main(["--model", "tiny", "--batch", "1", "2", "--steps", "4", "--prefill-tokens", "64",
               "--repeats", "1", "--core", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report
    assert set(report["dtypes"]) == {"float32", "bfloat16"}
    for r in report["dtypes"].values():
        assert set(r["decode_step_ms_by_batch"]) == {"1", "2"} and set(r["prefill_ms_by_tokens"]) == {"64"}
        times = [*r["decode_step_ms_by_batch"].values(), *r["prefill_ms_by_tokens"].values()]
        assert all(v > 0 for v in times)
    assert report["auto_dtype"] in ("float32", "bfloat16") and report["conditions"]["core"] == 0
