"""Every NATS subject, stream, consumer and bucket name kvrelay uses, in one place.

All subjects live under ``kvrelay.<namespace>.`` so several deployments can share one
NATS cluster. The README's "Bus protocol" section documents each one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# a subject a client may ask us to publish to: dot-separated tokens, no wildcards or spaces
_SUBJECT = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def check_token(value: str, what: str = "name") -> str:
    """A single subject token (namespace, tenant, worker id, request id)."""
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} must be 1-64 characters of letters, digits, '_' or '-'")
    return value


def check_subject(value: str, what: str = "subject") -> str:
    """A full subject given by a client: no wildcards, whitespace or control characters."""
    if not isinstance(value, str) or len(value) > 256 or not _SUBJECT.match(value):
        raise ValueError(f"{what} {value!r} is not a valid NATS subject (tokens of [A-Za-z0-9_-] joined by '.')")
    return value


@dataclass(frozen=True)
class Subjects:
    namespace: str = "default"

    def __post_init__(self) -> None:
        check_token(self.namespace, "namespace")

    @property
    def root(self) -> str:
        return f"kvrelay.{self.namespace}"

    # --- requests from pub/sub clients (JetStream stream REQ) -------------------------------
    def request(self, tenant: str) -> str:
        return f"{self.root}.req.{check_token(tenant, 'tenant')}"

    @property
    def request_all(self) -> str:
        return f"{self.root}.req.*"

    # --- router -> prefill worker (core request/reply) --------------------------------------
    def prefill(self, worker_id: str) -> str:
        return f"{self.root}.prefill.{check_token(worker_id, 'worker id')}"

    # --- prefill -> decode work queue (JetStream stream PREFILLED) ---------------------------
    @property
    def prefilled(self) -> str:
        return f"{self.root}.prefilled"

    def prefilled_for(self, decode_id: str) -> str:
        """A PrefillDone meant for one decode worker (multi-step affinity)."""
        return f"{self.root}.prefilled.{check_token(decode_id, 'worker id')}"

    # --- router -> one decode worker: local prefill (core request/reply) -------------------
    def local_prefill(self, decode_id: str) -> str:
        """A ``PrefillTask`` the decode worker runs whole (prompt and decode), no KV transfer."""
        return f"{self.root}.local.{check_token(decode_id, 'worker id')}"

    # --- token streams ------------------------------------------------------------------------
    def tokens(self, request_id: str) -> str:
        return f"{self.root}.tokens.{check_token(request_id, 'request id')}"

    # --- KV cache: events, lease releases -----------------------------------------------------
    def kv_events(self, worker_id: str) -> str:
        return f"{self.root}.kv.events.{check_token(worker_id, 'worker id')}"

    @property
    def kv_events_all(self) -> str:
        return f"{self.root}.kv.events.*"

    def kv_snapshot(self, worker_id: str) -> str:
        """Routers ask one worker for a ``KvSnapshot`` of its cache here (after an event-id gap)."""
        return f"{self.root}.kv.snapshot.{check_token(worker_id, 'worker id')}"

    # --- routers: shared dispatch-time load ---------------------------------------------------
    def inflight(self, router_id: str) -> str:
        """One router's ``InflightDelta`` messages (router/shared_inflight.py)."""
        return f"{self.root}.inflight.{check_token(router_id, 'router id')}"

    @property
    def inflight_all(self) -> str:
        return f"{self.root}.inflight.*"

    def kv_release(self, worker_id: str) -> str:
        return f"{self.root}.kv.release.{check_token(worker_id, 'worker id')}"

    def client(self, tenant: str) -> str:
        """The prefix of a tenant's stream subjects (``<prefix>.<anything>``): with tenants
        configured, a tenant may subscribe there and nowhere else in kvrelay's space."""
        return f"{self.root}.client.{check_token(tenant, 'tenant')}"

    @staticmethod
    def inbox_prefix(tenant: str) -> str:
        """The inbox prefix a tenant's NATS connection must use (nats-py ``inbox_prefix``): its
        JetStream publish acks arrive there."""
        return f"_INBOX_{check_token(tenant, 'tenant')}"

    # --- control ---------------------------------------------------------------------------------
    def cancel(self, tenant: str, request_id: str) -> str:
        """Cancel one request: a tenant may publish only on its own ``cancel.<tenant>.*``, and
        workers and routers honour it only for that tenant's requests."""
        return f"{self.root}.cancel.{check_token(tenant, 'tenant')}.{check_token(request_id, 'request id')}"

    @property
    def cancel_all(self) -> str:
        return f"{self.root}.cancel.*.*"

    # --- JetStream names (streams, consumers and buckets allow no dots) -----------------------------
    @property
    def stream_requests(self) -> str:
        return f"KVRELAY_{self.namespace}_REQ"

    @property
    def stream_prefilled(self) -> str:
        return f"KVRELAY_{self.namespace}_PREFILLED"

    @property
    def stream_kv_events(self) -> str:
        return f"KVRELAY_{self.namespace}_KV_EVENTS"

    @property
    def consumer_decode(self) -> str:
        return "decode"

    @property
    def consumer_router(self) -> str:
        return "router"

    @property
    def bucket_workers(self) -> str:
        return f"kvrelay_{self.namespace}_workers"
