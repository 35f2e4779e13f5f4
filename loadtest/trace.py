"""Trace replay files: JSON lines with arrival times and per-block hash ids (Mooncake's format).

One request per line, in arrival order::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, ...]}

- ``timestamp``: arrival time in milliseconds from the trace's start (int or float, >= 0,
  never decreasing from one line to the next).
- ``input_length`` / ``output_length``: prompt and output tokens (ints >= 1).
- ``hash_ids``: one id (int >= 0) per ``block_size`` tokens of the prompt, in order; two requests
  whose lists start with the same ids share that many leading blocks (a prefix cache can reuse
  them). Mooncake's published traces use 512-token blocks (``DEFAULT_BLOCK_SIZE``). The list may
  cover fewer blocks than the prompt has (the rest is unique to the request) but not more.

Other keys are ignored; blank lines are skipped. Any other problem is a ``TraceError`` naming
the file and line. Files hold at most ``max_records`` requests (default 1,000,000): past it,
a ``TraceError`` rather than unbounded memory.

``prompt_tokens`` turns a record into token ids deterministically: the block with hash id h is
``block_size`` ids drawn from a generator seeded by ``(seed, h)``, so equal hash ids give equal
blocks (shared prefixes) across requests and runs; tokens past the hashed blocks are drawn from
``(seed, line)``. Generated blocks are cached (LRU, ``cache_blocks`` entries).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_BLOCK_SIZE = 512
VOCAB = 49152
MAX_RECORDS = 1_000_000
_UNIQUE = 1 << 40  # seed-space offset of the per-request tail tokens (never a hash id's key)


class TraceError(ValueError):
    """A trace file is unreadable or malformed; the message names the file and the line."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    line: int  # 1-based line in the file (for messages, and the per-request token seed)


def _int_field(obj: dict[str, Any], name: str, lo: int, path: Path, line: int) -> int:
    if name not in obj:
        raise TraceError(path, line, f"missing field {name!r}")
    v = obj[name]
    if type(v) is not int:
        raise TraceError(path, line, f"field {name!r} must be an integer, got {type(v).__name__} {v!r}")
    if v < lo:
        raise TraceError(path, line, f"field {name!r} must be >= {lo}, got {v}")
    return v


def _timestamp(obj: dict[str, Any], path: Path, line: int) -> float:
    if "timestamp" not in obj:
        raise TraceError(path, line, "missing field 'timestamp'")
    v = obj["timestamp"]
    if type(v) not in (int, float) or not math.isfinite(v):
        raise TraceError(path, line, f"field 'timestamp' must be a number of milliseconds, got {v!r}")
    if v < 0:
        raise TraceError(path, line, f"field 'timestamp' must be >= 0, got {v}")
    return float(v)


def _hash_ids(obj: dict[str, Any], input_length: int, block_size: int, path: Path,
              line: int) -> tuple[int, ...]:
    if "hash_ids" not in obj:
        raise TraceError(path, line, "missing field 'hash_ids'")
    v = obj["hash_ids"]
    if not isinstance(v, list):
        raise TraceError(path, line, f"field 'hash_ids' must be a list of integers, got {type(v).__name__}")
    for i, h in enumerate(v):
        if type(h) is not int or h < 0:
            raise TraceError(path, line, f"hash_ids[{i}] must be an integer >= 0, got {h!r}")
    blocks = -(-input_length // block_size)
    if len(v) > blocks:
        raise TraceError(path, line, f"{len(v)} hash_ids for input_length {input_length}: more than its "
                                     f"{blocks} blocks of {block_size} tokens (wrong --trace-block-size?)")
    return tuple(v)


def parse_line(text: str, path: Path, line: int, block_size: int) -> TraceRecord:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise TraceError(path, line, f"not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise TraceError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    ts = _timestamp(obj, path, line)
    inp = _int_field(obj, "input_length", 1, path, line)
    out = _int_field(obj, "output_length", 1, path, line)
    return TraceRecord(ts, inp, out, _hash_ids(obj, inp, block_size, path, line), line)


def load_trace(path: str | Path, block_size: int = DEFAULT_BLOCK_SIZE, limit: int | None = None,
               max_records: int = MAX_RECORDS) -> list[TraceRecord]:
    """Every record of the file (the first ``limit`` when given), checked; ``TraceError`` otherwise."""
    p = Path(path)
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    try:
        f = p.open("r", encoding="utf-8")
    except OSError as exc:
        raise TraceError(p, None, f"cannot open: {exc.strerror or exc}") from exc
    out: list[TraceRecord] = []
    with f:
        try:
            for i, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                if len(out) >= max_records:
                    raise TraceError(p, i, f"more than {max_records} records")
                rec = parse_line(text, p, i, block_size)
                if out and rec.timestamp_ms < out[-1].timestamp_ms:
                    raise TraceError(p, i, f"timestamp {rec.timestamp_ms:g} is before the previous line's "
                                           f"{out[-1].timestamp_ms:g} (line {out[-1].line}): records must be "
                                           f"in arrival order")
                out.append(rec)
                if limit is not None and len(out) >= limit:
                    break
        except UnicodeDecodeError as exc:
            raise TraceError(p, None, f"not UTF-8 text: {exc}") from exc
    if not out:
        raise TraceError(p, None, "no records (the file is empty)")
    return out


class TraceTokens:
    """Token ids for trace records: equal hash ids give equal blocks (see the module docstring)."""

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0, vocab: int = VOCAB,
                 cache_blocks: int = 4096) -> None:
        if block_size < 1 or vocab < 2 or cache_blocks < 1:
            raise ValueError("block_size, vocab and cache_blocks must be positive (vocab >= 2)")
        self.block_size, self.seed, self.vocab, self.cache_blocks = block_size, seed, vocab, cache_blocks
        self._cache: OrderedDict[int, list[int]] = OrderedDict()

    def block(self, hash_id: int) -> list[int]:
        got = self._cache.get(hash_id)
        if got is None:
            rng = np.random.default_rng([self.seed, hash_id])
            got = rng.integers(0, self.vocab, self.block_size).tolist()
            self._cache[hash_id] = got
            if len(self._cache) > self.cache_blocks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(hash_id)
        return got

    def prompt_tokens(self, rec: TraceRecord) -> list[int]:
        out: list[int] = []
        for h in rec.hash_ids:
            out.extend(self.block(h))
        out = out[: rec.input_length]
        rest = rec.input_length - len(out)
        if rest:
            rng = np.random.default_rng([self.seed, _UNIQUE + rec.line])
            out.extend(rng.integers(0, self.vocab, rest).tolist())
        return out
