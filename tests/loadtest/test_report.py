"""loadtest.report.emit: one JSON text, printed and written where asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_emit_prints_and_writes_the_same_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvrelay.loadtest.report import emit

    out = tmp_path / "deep" / "r.json"
    text = emit({"bench": "x", "n": [1, 2]}, out)
    assert json.loads(capsys.readouterr().out) == {"bench": "x", "n": [1, 2]}
    assert out.read_text() == text + "\n"
    emit({"quiet": True}, None, echo=False)
    assert capsys.readouterr().out == ""
