"""The root config: one validated section per component, loaded from a file plus overrides.

A config file is JSON or TOML shaped like ``Config`` (``{"router": {"max_inflight": 64}}``);
unknown keys anywhere are an error naming the key. ``--set router.max_inflight=64`` style
overrides apply on top (values parsed as JSON when they parse, else taken as strings).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kvrelay.router.config import RouterConfig, RouterProcessConfig
from kvrelay.schemas.errors import ValidationError
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.schemas.struct import Struct, typed
from kvrelay.supervisor import SuperviseConfig
from kvrelay.transport.config import BusConfig
from kvrelay.workers.config import DecodeConfig, EngineConfig, PrefillConfig, WorkerProcessConfig


@typed
class Config(Struct):
    """The deployment: shared sections (``bus``, ``cache``) and one section per component."""

    bus: BusConfig = BusConfig()
    cache: CacheConfig = CacheConfig()
    router: RouterConfig = RouterConfig()
    engine: EngineConfig = EngineConfig()
    prefill: PrefillConfig = PrefillConfig()
    decode: DecodeConfig = DecodeConfig()
    supervise: SuperviseConfig = SuperviseConfig()  # kvrelay up: restarts of dead children

    def worker_process(self) -> WorkerProcessConfig:
        """What a worker process is built from (everything but the router's section)."""
        return WorkerProcessConfig(bus=self.bus, cache=self.cache, engine=self.engine, prefill=self.prefill,
                            decode=self.decode)

    def router_process(self) -> RouterProcessConfig:
        """What a router process is built from (everything but the workers' sections)."""
        return RouterProcessConfig(bus=self.bus, cache=self.cache, router=self.router)


class ConfigError(ValueError):
    """The config file or an override is malformed; the message names the key."""


def _read_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        if p.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"config file {path} is not valid {p.suffix or 'JSON'}: {exc}") from exc


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (nested with more dots) to a plain config mapping."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a section")
    node[parts[-1]] = _parse_value(raw.strip())


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load(
    path: str | None = None,
    overrides: Iterable[str] = (),
    values: Mapping[str, Any] | None = None,
) -> Config:
    """File, then ``values`` (from command-line flags), then ``--set`` overrides; validated."""
    data: dict[str, Any] = _read_file(path) if path else {}
    if values:
        data = merge(data, values)
    for o in overrides:
        apply_override(data, o)
    try:
        return Config.from_mapping(data, path="config")
    except ValidationError as exc:
        raise ConfigError(str(exc)) from exc
