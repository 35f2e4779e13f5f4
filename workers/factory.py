"""Build the engine a worker runs from ``engine.kind``; each engine package is imported only when used.

Every engine class takes the same arguments: ``(engine_cfg, role_cfg, cache, worker_id=...)``,
where ``role_cfg`` is the ``PrefillConfig`` or ``DecodeConfig`` and ``cache`` the deployment's
cache contract (block size, hash seed, tenant salt secret: routers and workers must name blocks
alike). After connecting, the services call ``engine.attach_bus(bus, worker_id)`` when an engine
has it (before ``start``), so an engine can publish its KV events on the bus.

To add an engine kind: write its two classes, add a loader below, and add the name to
``EngineConfig.kind``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvrelay.workers.config import WorkerProcessConfig
from kvrelay.workers.engine import DecodeEngine, PrefillEngine
from kvrelay.workers.errors import WorkerError


class EngineUnavailable(WorkerError):
    """The configured engine kind cannot be built here (its package cannot be imported)."""

    code = "engine_unavailable"


def _vllm() -> tuple[type, type]:
    from kvrelay.workers.vllm_engine import VllmDecodeEngine, VllmPrefillEngine

    return VllmPrefillEngine, VllmDecodeEngine


def _sim() -> tuple[type, type]:
    from kvrelay.workers.sim import SimDecodeEngine, SimPrefillEngine

    return SimPrefillEngine, SimDecodeEngine


ENGINES: dict[str, Callable[[], tuple[type, type]]] = {"vllm": _vllm, "sim": _sim}
"""Engine kind -> a loader returning its (prefill, decode) classes."""


def _classes(kind: str) -> tuple[type, type]:
    loader = ENGINES.get(kind)
    if loader is None:
        raise EngineUnavailable(f"unknown engine kind {kind!r} (expected one of {sorted(ENGINES)})")
    try:
        return loader()
    except ImportError as exc:
        raise EngineUnavailable(f"engine {kind!r} cannot be imported here: {exc}") from exc


def prefill_engine(cfg: WorkerProcessConfig, worker_id: str = "") -> PrefillEngine:
    cls: Any = _classes(cfg.engine.kind)[0]
    return cls(cfg.engine, cfg.prefill, cfg.cache, worker_id=worker_id)


def decode_engine(cfg: WorkerProcessConfig, worker_id: str = "") -> DecodeEngine:
    cls: Any = _classes(cfg.engine.kind)[1]
    return cls(cfg.engine, cfg.decode, cfg.cache, worker_id=worker_id)
