"""Worker-service test plumbing.

The test folders are not packages (pytest runs with --import-mode=importlib), so the helper
modules next to this file are loaded here under fixed names, before the test modules of this
folder are imported: ``from workers_fake_engines import ...`` / ``from workers_harness import ...``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _load(module_name: str, file_name: str) -> None:
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, Path(__file__).with_name(file_name))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)


_load("workers_fake_engines", "fake_engines.py")
_load("workers_harness", "harness.py")
