"""Build the engine a worker runs from ``cfg.engine.kind``; engine modules are imported lazily.

    "vllm" -> kvrelay.workers.vllm_engine: VllmPrefillEngine(engine_cfg, prefill_cfg),
                                           VllmDecodeEngine(engine_cfg, decode_cfg)
    "sim"  -> kvrelay.workers.sim:         SimPrefillEngine(engine_cfg, prefill_cfg),
                                           SimDecodeEngine(engine_cfg, decode_cfg)

A constructor that takes a ``worker_id`` keyword gets the worker's id. Every engine gets the
tenant salt secret of the root config, ``router.tenant_salt_secret`` (one secret for the whole
deployment: routers and workers must name blocks alike): as a ``salt_secret`` keyword when the
constructor takes one (simulated engines), else set on the engine's ``salt_secret`` attribute
(vLLM engines read it when they start publishing KV events). After connecting, the
services call ``engine.attach_bus(bus, worker_id)`` when an engine has it (before ``start``), so
an engine can publish its KV events on the bus.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from kvrelay.workers.engine import DecodeEngine, PrefillEngine
from kvrelay.workers.errors import WorkerError

if TYPE_CHECKING:
    from kvrelay.config import Config

_MODULES = {"vllm": ("kvrelay.workers.vllm_engine", "Vllm"), "sim": ("kvrelay.workers.sim", "Sim")}


class EngineUnavailable(WorkerError):
    """The configured engine kind cannot be built here (module or class missing)."""

    code = "engine_unavailable"


def _engine_class(kind: str, role: str) -> Any:
    if kind not in _MODULES:
        raise EngineUnavailable(f"unknown engine kind {kind!r} (expected one of {sorted(_MODULES)})")
    module_name, prefix = _MODULES[kind]
    class_name = f"{prefix}{role}Engine"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailable(f"engine {kind!r}: cannot import {module_name}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise EngineUnavailable(f"engine {kind!r} is not available yet: {module_name} has no {class_name}")
    return cls


def _build(cls: Any, engine_cfg: Any, role_cfg: Any, worker_id: str, salt_secret: str) -> Any:
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    # engines that name their exports / KV events after the worker take its id
    if worker_id and "worker_id" in params:
        kwargs["worker_id"] = worker_id
    if salt_secret and "salt_secret" in params:
        kwargs["salt_secret"] = salt_secret
    engine = cls(engine_cfg, role_cfg, **kwargs)
    if salt_secret and "salt_secret" not in kwargs:
        if not hasattr(engine, "salt_secret"):
            raise EngineUnavailable(f"{cls.__name__} cannot salt block hashes "
                                    f"(router.tenant_salt_secret is set)")
        engine.salt_secret = salt_secret
    return engine


def prefill_engine(cfg: Config, worker_id: str = "") -> PrefillEngine:
    return _build(_engine_class(cfg.engine.kind, "Prefill"), cfg.engine, cfg.prefill, worker_id,
                  cfg.router.tenant_salt_secret)


def decode_engine(cfg: Config, worker_id: str = "") -> DecodeEngine:
    return _build(_engine_class(cfg.engine.kind, "Decode"), cfg.engine, cfg.decode, worker_id,
                  cfg.router.tenant_salt_secret)
