"""Writing a benchmark's JSON report: to stdout, and to a file when one is named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], out: Path | None, echo: bool = True) -> str:
    """Print ``report`` as indented JSON (when ``echo``) and write it to ``out`` (if given)."""
    text = json.dumps(report, indent=2)
    if echo:
        print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text
