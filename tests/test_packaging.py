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
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (whl,) = out.glob("kvrelay-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
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


def test_packaging_wheel_holds_the_c_extensions(wheel_names: set[str]) -> None:
    """The prefix index's storage and the block-hash chain are built into the wheel (a compiler is
    part of this project's machines; without one they are skipped and the Python paths serve)."""
    for module in ("kvrelay/router/_holders", "kvrelay/schemas/_chainhash"):
        assert any(n.startswith(module) and n.endswith(".so") for n in wheel_names), module


def test_packaging_console_script_is_declared(wheel_names: set[str]) -> None:
    assert any(n.endswith("entry_points.txt") for n in wheel_names)


def test_packaging_normal_install_imports_every_component(wheel: Path, tmp_path) -> None:
    """A plain (non-editable) install of the wheel serves `kvrelay.*` on its own, no source tree needed."""
    import sysconfig

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # -S: no .pth files, so the editable finder of the development install is not active
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_path('purelib')}", "PATH": "/usr/bin:/bin"}
    code = ("import kvrelay.schemas, kvrelay.transport.subjects, kvrelay.router.policy, kvrelay.workers.engine, "
            "kvrelay.kernels, kvrelay.loadtest.workloads, kvrelay.config; import kvrelay; print(kvrelay.__file__); "
            "from kvrelay.router.index import NATIVE; from kvrelay.schemas.hashing import _native; "
            "assert NATIVE and _native is not None")
    out = subprocess.run([sys.executable, "-S", "-P", "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(target))
