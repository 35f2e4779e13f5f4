"""Prometheus metrics of KV transfers, counted in the process that serves ``/metrics``.

Reads may run elsewhere (vLLM's EngineCore process, for the connector): their outcome travels
back (the connector's ``Notice``) and is recorded here by ``record`` / ``record_failure``.
Created once in prometheus_client's default registry; label values are bounded (backend names,
error codes).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram

from kvrelay.base.logs import get_logger

log = get_logger(__name__)

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

TRANSFERS = Counter("kvrelay_kv_transfer_backend_total",
                    "KV transfers completed, by the backend that moved them", ["backend"])
BYTES = Counter("kvrelay_kv_transfer_bytes_total", "KV bytes moved, by backend", ["backend"])
SECONDS = Histogram("kvrelay_kv_transfer_seconds", "Time of one KV transfer (the read), by backend",
                    ["backend"], buckets=_SECONDS)
FAILURES = Counter("kvrelay_kv_transfer_failures_total", "KV transfers that failed (the request fell back)",
                   ["code"])
SKIPPED = Counter("kvrelay_kv_transfer_fallthrough_total",
                  "A preferred backend could not be used and the next one was tried", ["backend", "code"])


def record(backend: str, nbytes: int, seconds: float, skipped: Iterable[tuple[str, str]] = ()) -> None:
    TRANSFERS.labels(backend).inc()
    BYTES.labels(backend).inc(nbytes)
    SECONDS.labels(backend).observe(seconds)
    for b, code in skipped:
        SKIPPED.labels(b, code).inc()


def record_failure(code: str, skipped: Iterable[tuple[str, str]] = ()) -> None:
    FAILURES.labels(code or "transfer").inc()
    for b, c in skipped:
        SKIPPED.labels(b, c).inc()


def encode_skipped(skipped: Iterable[tuple[str, str]]) -> list[str]:
    """``[("cma", "cma_denied")]`` -> ``["cma:cma_denied"]`` (for messages)."""
    return [f"{b}:{c}"[:64] for b, c in skipped]


def decode_skipped(items: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        b, _, c = item.partition(":")
        out.append((b, c))
    return out
