"""Every environment variable kvrelay reads, in one place, typed, with its default.

Nothing else in kvrelay calls ``os.environ.get`` for its own settings: components receive
values through their configs. (Variables kvrelay *sets* for vLLM child processes are listed
in ``workers/vllm_engine``.)
"""

from __future__ import annotations

import os
from pathlib import Path


def _str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def cache_dir() -> Path:
    """KVRELAY_CACHE: prepared models and other one-off artefacts (default ~/.cache/kvrelay)."""
    return Path(_str("KVRELAY_CACHE", str(Path.home() / ".cache" / "kvrelay"))).expanduser()


def run_dir() -> Path:
    """KVRELAY_RUN_DIR: sockets and the embedded nats-server's store (default ./.kvrelay)."""
    return Path(_str("KVRELAY_RUN_DIR", ".kvrelay")).expanduser().absolute()


def log_level() -> str:
    """KVRELAY_LOG_LEVEL: debug, info (default), warning, error."""
    return _str("KVRELAY_LOG_LEVEL", "info").lower()


def log_format() -> str:
    """KVRELAY_LOG_FORMAT: json (default) or console."""
    return _str("KVRELAY_LOG_FORMAT", "json").lower()


def nats_url() -> str | None:
    """KVRELAY_NATS_URL: default for --nats-url."""
    return os.environ.get("KVRELAY_NATS_URL") or None


def namespace() -> str | None:
    """KVRELAY_NAMESPACE: default for --namespace."""
    return os.environ.get("KVRELAY_NAMESPACE") or None


def config_file() -> str | None:
    """KVRELAY_CONFIG: a JSON or TOML config file, overridden by command-line flags."""
    return os.environ.get("KVRELAY_CONFIG") or None
