"""Tenants: who may use a deployment, with what credentials and limits. Loaded from a file.

A tenants file (JSON or TOML) is ``{"tenants": [{"name": ..., ...}, ...]}``; unknown keys are
errors naming the key. Secrets are never stored in it:

- ``api_keys``: HTTP bearer keys as ``"sha256:<hex>"`` of the key (keys are long random strings,
  so a plain SHA-256 is enough; ``hash_api_key``);
- ``nats_password``: the tenant's NATS password as a bcrypt hash (``$2a$...``), which nats-server
  checks itself ("" = the tenant has no NATS access, HTTP only).

``kvrelay tenants add NAME --file F`` makes both secrets, prints them once and stores their hashes.
With no tenants file the deployment is open (the laptop default): any client is the default tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

from kvrelay.schemas.errors import ValidationError
from kvrelay.schemas.struct import Struct, limit

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_BCRYPT = re.compile(r"^\$2[ab]\$\d\d\$[./A-Za-z0-9]{53}$")
MAX_TENANTS = 1024


class TenantSpec(Struct):
    name: str = limit(max_len=64)  # [A-Za-z0-9_-]: it is a subject token (kvrelay.<ns>.req.<name>)
    api_keys: list[str] = limit([], max_len=16)  # "sha256:<hex>" of each HTTP bearer key
    nats_password: str = limit("", max_len=128)  # bcrypt hash; "" = no NATS access
    weight: float = limit(1.0, min=0.01, max=1000.0)  # share of contested capacity
    max_inflight: int = limit(0, min=0, max=1 << 20)  # requests at once; 0 = unlimited
    tokens_per_minute: int = limit(0, min=0, max=1 << 40)  # prompt + output tokens; 0 = unlimited
    max_context: int = limit(0, min=0, max=1 << 24)  # prompt + max_tokens; 0 = the model's

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise ValidationError("tenant.name", f"{self.name!r} must be 1-64 of [A-Za-z0-9_-]")
        for key in self.api_keys:
            if not _KEY_HASH.match(key):
                raise ValidationError(f"tenant {self.name}.api_keys", "each key is 'sha256:<64 hex digits>' "
                                      "(kvrelay tenants add makes them)")
        if self.nats_password and not _BCRYPT.match(self.nats_password):
            raise ValidationError(f"tenant {self.name}.nats_password", "must be a bcrypt hash ($2a$...)")


class TenantsConfig(Struct):
    tenants: list[TenantSpec] = limit([], max_len=MAX_TENANTS)

    def validate(self) -> None:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValidationError("tenants", "tenant names must be unique")
        keys = [k for t in self.tenants for k in t.api_keys]
        if len(set(keys)) != len(keys):
            raise ValidationError("tenants", "an API key belongs to one tenant only")

    def get(self, name: str) -> TenantSpec | None:
        return next((t for t in self.tenants if t.name == name), None)

    def by_key(self, key: str) -> TenantSpec | None:
        """The tenant whose API key this is (compared in constant time)."""
        digest = hash_api_key(key)
        found = None
        for t in self.tenants:
            for k in t.api_keys:
                if hmac.compare_digest(k, digest):
                    found = t
        return found


def hash_api_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class TenantsError(ValueError):
    """The tenants file cannot be read or is invalid; the message names the key."""


def read_tenants(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TenantsError(f"cannot read tenants file {p}: {exc}") from exc
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise TenantsError(f"tenants file {p} is not valid {p.suffix or 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise TenantsError(f"tenants file {p}: the top level must be an object with 'tenants'")
    return data


def load_tenants(path: str | Path) -> TenantsConfig:
    try:
        return TenantsConfig.from_mapping(read_tenants(path), path="tenants_file")
    except ValidationError as exc:
        raise TenantsError(f"tenants file {path}: {exc}") from exc
