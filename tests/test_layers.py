"""The import rules of ARCHITECTURE.md, enforced: no upward import, no sideways import.

Every ``import``/``from ... import`` of a kvrelay module in the product's source (module level,
inside functions and under ``TYPE_CHECKING`` alike) and every ``importlib.import_module("kvrelay...")``
is checked against ``ALLOWED``: what each package may import besides itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> the package it installs as (pyproject.toml [tool.setuptools.package-dir])
FOLDERS = {
    "kvrelay": "kvrelay",
    "schemas": "kvrelay.schemas",
    "transport": "kvrelay.transport",
    "kernels": "kvrelay.kernels",
    "router": "kvrelay.router",
    "workers": "kvrelay.workers",
    "loadtest": "kvrelay.loadtest",
}

BOTTOM = ("kvrelay.base", "kvrelay.schemas", "kvrelay.kernels")
TOP = ("kvrelay.cli", "kvrelay.config", "kvrelay.up", "kvrelay.supervisor", "kvrelay.models", "kvrelay.tenants_cli",
       "kvrelay.loadtest")

# package -> the packages it may import (besides itself). Bottom layer first, top layer last.
ALLOWED: dict[str, tuple[str, ...]] = {
    "kvrelay.base": (),
    "kvrelay.schemas": ("kvrelay.base",),
    "kvrelay.kernels": ("kvrelay.base",),
    "kvrelay.transport": BOTTOM,
    "kvrelay.router": (*BOTTOM, "kvrelay.transport"),  # never kvrelay.workers: they meet on the bus
    "kvrelay.workers": (*BOTTOM, "kvrelay.transport"),  # never kvrelay.router
    # the top layer wires the rest together; nothing below imports it
    **{top: ("kvrelay",) for top in TOP},
}


def package_of(module: str) -> str:
    """The ``ALLOWED`` key a kvrelay module belongs to (longest matching prefix)."""
    best = ""
    for pkg in ALLOWED:
        if (module == pkg or module.startswith(pkg + ".")) and len(pkg) > len(best):
            best = pkg
    if not best:
        raise AssertionError(f"{module} belongs to no layer: add its package to ALLOWED")
    return best


def allowed(importer: str, imported: str) -> bool:
    src, dst = package_of(importer), package_of(imported)
    if src == dst or imported == "kvrelay":
        return True
    return any(dst == a or dst.startswith(a + ".") or a == "kvrelay" for a in ALLOWED[src])


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")[: -node.level]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, source: str) -> list[tuple[int, str]]:
    """(line, imported kvrelay module) for every kvrelay import in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            # ``from kvrelay import models`` imports the module kvrelay.models
            found += [(node.lineno, f"{target}.{a.name}" if target == "kvrelay" else target) for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) ==
              "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value)))
    return [(line, name) for line, name in found if name == "kvrelay" or name.startswith("kvrelay.")]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1][: -len(".py")]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def violations(module: str, source: str) -> list[str]:
    return [f"{module}:{line} imports {name}" for line, name in imports_of(module, source)
            if not allowed(module, name)]


def product_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_layers_every_product_module_keeps_the_import_rules() -> None:
    files = product_files()
    assert len(files) > 100  # the walk found the product
    bad = [v for path in files for v in violations(module_name(path), path.read_text())]
    assert not bad, "imports against the layer rules (ARCHITECTURE.md):\n" + "\n".join(bad)


@pytest.mark.parametrize(("module", "source"), [
    ("kvrelay.router.app", "from kvrelay.workers.decode import serve"),  # sideways
    ("kvrelay.workers.decode", "import kvrelay.router.errors"),  # sideways
    ("kvrelay.transport.bus", "from kvrelay.config import Config"),  # upward, to the top layer
    ("kvrelay.schemas.messages", "from kvrelay.transport.subjects import Subjects"),  # upward
    ("kvrelay.base.logs", "from kvrelay.schemas import codec"),  # the bottom imports nothing
    ("kvrelay.router.policy_factory", "def f():\n    from kvrelay import models"),  # inside a function
    ("kvrelay.workers.factory", "import importlib\nimportlib.import_module('kvrelay.router.app')"),
    ("kvrelay.router.http", "from ..workers import slots"),  # relative
])
def test_layers_a_violation_is_reported(module: str, source: str) -> None:
    assert violations(module, source)


@pytest.mark.parametrize(("module", "source"), [
    ("kvrelay.router.app", "from kvrelay.transport.bus import Bus\nfrom kvrelay.base.logs import get_logger"),
    ("kvrelay.workers.decode", "from kvrelay.schemas.hashing import CacheConfig"),
    ("kvrelay.cli", "from kvrelay.router.app import serve\nfrom kvrelay.workers.decode import serve"),
    ("kvrelay.loadtest.compare", "from kvrelay import models"),
    ("kvrelay.transport.kv.copy", "from kvrelay import kernels"),
])
def test_layers_an_allowed_import_passes(module: str, source: str) -> None:
    assert violations(module, source) == []
