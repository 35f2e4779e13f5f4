"""The built wheel holds every module of every component folder, under the one package `kvrelay`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kvrelay": "kvrelay", "schemas": "kvrelay/schemas", "transport": "kvrelay/transport",
           "kernels": "kvrelay/kernels", "router": "kvrelay/router", "workers": "kvrelay/workers",
           "loadtest": "kvrelay/loadtest"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (whl,) = out.glob("kvrelay-*.whl")
    with zipfile.ZipFile(whl) as zf:
        return set(zf.namelist())


def test_packaging_wheel_holds_every_module(wheel_names: set[str]) -> None:
    expected = set()
    for folder, target in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            expected.add(f"{target}/{f.relative_to(ROOT / folder).as_posix()}")
    missing = sorted(expected - wheel_names)
    assert not missing, f"modules missing from the wheel (list their packages in pyproject.toml): {missing}"


def test_packaging_wheel_has_no_bare_top_level_component(wheel_names: set[str]) -> None:
    tops = {n.split("/", 1)[0] for n in wheel_names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert tops == {"kvrelay"}, tops


def test_packaging_console_script_is_declared(wheel_names: set[str]) -> None:
    assert any(n.endswith("entry_points.txt") for n in wheel_names)
