"""The router's view of tenants: who a request is from, and whether its tenant is within its quotas.

``Tenants`` holds the tenants file (``router.tenants_file``; ``schemas/tenants.py``), re-read
when it changes (``watch``: every ``RELOAD_S``, an invalid file is logged and the last good one
kept). With no file the router is open: every request is ``router.default_tenant`` (or the
``X-Kvrelay-Tenant`` header), as before.

With tenants: HTTP requests name their tenant by ``Authorization: Bearer <key>`` only (401
without a known key; a ``X-Kvrelay-Tenant`` header naming another tenant is 403); NATS requests
by the subject they were published on, which nats-server lets only that tenant publish.

Quotas (``Quotas``, pure): per tenant, requests in flight (``max_inflight``) and prompt + output
tokens per minute (``tokens_per_minute``, a sliding window of one-second buckets, charged at
admission with prompt + max_tokens and corrected at the end with what was produced). Over either:
429 with ``Retry-After`` and the limit's name. Quotas are per router replica (each replica enforces
the whole quota on what it admits); state is bounded by the configured tenants.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

from kvrelay.base.logs import get_logger
from kvrelay.router.errors import ContextTooLong, PermissionDenied, QuotaExceeded, Unauthorized
from kvrelay.router.metrics import RouterMetrics
from kvrelay.schemas.tenants import TenantsConfig, TenantsError, TenantSpec, load_tenants

log = get_logger(__name__)

RELOAD_S = 2.0
WINDOW_S = 60


class Tenants:
    """The configured tenants (None: open deployment) and their quotas."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.config: TenantsConfig | None = load_tenants(path) if path else None
        self._mtime = _mtime(path)
        self.quotas = Quotas()
        self.reloads = 0

    @property
    def enabled(self) -> bool:
        return self.config is not None

    def reload(self) -> bool:
        """Re-read the file if it changed; True when a new config was taken."""
        mtime = _mtime(self.path)
        if not self.path or mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            self.config = load_tenants(self.path)
        except TenantsError as exc:
            log.error("tenants_reload_failed", error=str(exc))
            return False
        self.reloads += 1
        log.info("tenants_reloaded", tenants=len(self.config.tenants))
        return True

    def weight(self, name: str) -> float:
        """``name``'s share of contested capacity (router/fair_queue.py): its ``weight``, 1 when unknown."""
        spec = self.config.get(name) if self.config is not None else None
        return spec.weight if spec is not None else 1.0

    def label(self, name: str) -> str:
        """The metrics label of ``name``: a configured tenant's name, else "open" (bounded by the config)."""
        return name if self.config is not None and self.config.get(name) is not None else "open"

    async def watch(self) -> None:
        """Re-read the file when it changes, until cancelled."""
        while True:
            await asyncio.sleep(RELOAD_S)
            await asyncio.to_thread(self.reload)

    def admit(self, spec: TenantSpec, prompt_tokens: int, max_tokens: int, metrics: RouterMetrics) -> int:
        """Check the tenant's context cap and quotas for one request; the tokens charged."""
        if spec.max_context and prompt_tokens + max_tokens > spec.max_context:
            raise ContextTooLong(f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over tenant "
                                 f"{spec.name!r}'s context limit of {spec.max_context}", param="max_tokens")
        charged = prompt_tokens + max_tokens
        self.quotas.admit(spec, charged)
        metrics.tenant_tokens.labels(spec.name, "prompt").inc(prompt_tokens)
        metrics.tenant_tokens.labels(spec.name, "max_tokens").inc(max_tokens)
        return charged

    def from_http(self, authorization: str | None, claimed: str | None) -> TenantSpec:
        """The tenant of an HTTP request (tenants configured)."""
        assert self.config is not None
        if not authorization:
            raise Unauthorized("this server needs an API key: 'Authorization: Bearer <key>'", code="missing_api_key")
        scheme, _, key = authorization.partition(" ")
        tenant = self.config.by_key(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise Unauthorized("the API key is not valid")
        if claimed is not None and claimed != tenant.name:
            raise PermissionDenied(f"this API key belongs to another tenant than {claimed!r}",
                                   param="X-Kvrelay-Tenant")
        return tenant

    def from_subject(self, name: str) -> TenantSpec:
        """The tenant of a NATS request: the subject's, which only it may publish."""
        assert self.config is not None
        tenant = self.config.get(name)
        if tenant is None:
            raise PermissionDenied(f"no tenant {name!r} is configured")
        return tenant


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


@dataclass
class _Usage:
    inflight: int = 0
    window: deque[tuple[int, int]] = field(default_factory=deque)  # (second, tokens), oldest first
    total: int = 0


class Quotas:
    """Per-tenant in-flight requests and tokens per minute. Pure (the clock is passed in)."""

    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}

    def _of(self, tenant: str, now: float) -> _Usage:
        u = self._usage.setdefault(tenant, _Usage())
        second = int(now)
        while u.window and u.window[0][0] <= second - WINDOW_S:
            u.total -= u.window.popleft()[1]
        return u

    def admit(self, spec: TenantSpec, tokens: int, now: float | None = None) -> None:
        """Take one request of ``tokens`` (prompt + max_tokens) or raise QuotaExceeded."""
        now = time.monotonic() if now is None else now
        u = self._of(spec.name, now)
        if spec.max_inflight and u.inflight >= spec.max_inflight:
            raise QuotaExceeded(f"tenant {spec.name!r} has {u.inflight} requests in flight, its limit",
                                code="tenant_max_inflight", retry_after_s=1.0)
        if spec.tokens_per_minute and u.total + tokens > spec.tokens_per_minute:
            wait = _refill_wait(u, spec.tokens_per_minute - tokens, now)
            raise QuotaExceeded(f"tenant {spec.name!r} is over its {spec.tokens_per_minute} tokens per minute",
                                code="tenant_tokens_per_minute", retry_after_s=wait)
        u.inflight += 1
        self._charge(u, tokens, now)

    def release(self, spec: TenantSpec, charged: int, used: int, now: float | None = None) -> None:
        """A request admitted with ``charged`` tokens ended having used ``used``."""
        now = time.monotonic() if now is None else now
        u = self._of(spec.name, now)
        u.inflight = max(0, u.inflight - 1)
        if used < charged:
            self._charge(u, used - charged, now)

    @staticmethod
    def _charge(u: _Usage, tokens: int, now: float) -> None:
        second = int(now)
        if u.window and u.window[-1][0] == second:
            u.window[-1] = (second, u.window[-1][1] + tokens)
        else:
            u.window.append((second, tokens))
        u.total += tokens

    def inflight(self, tenant: str) -> int:
        u = self._usage.get(tenant)
        return u.inflight if u else 0


def _refill_wait(u: _Usage, room: int, now: float) -> float:
    """Seconds until the window has dropped enough to leave ``room`` tokens (at least 1)."""
    total = u.total
    for second, tokens in u.window:
        total -= tokens
        if total <= max(room, 0):
            return max(1.0, math.ceil(second + WINDOW_S - now))
    return float(WINDOW_S)
