"""Bus configuration: where NATS is, the namespace, and the bound of every stream and bucket."""

from __future__ import annotations

from typing import Literal

from kvrelay.schemas.errors import ValidationError
from kvrelay.schemas.struct import Struct, limit, typed
from kvrelay.transport.subjects import check_token


@typed
class StreamLimits(Struct):
    """Bounds of one JetStream stream. ``discard="new"`` rejects publishes when full (push back)."""

    max_msgs: int = limit(10_000, min=1)
    max_bytes: int = limit(256 << 20, min=1024)
    max_age_s: float = limit(600.0, min=1.0)
    max_msg_size: int = limit(4 << 20, min=1024)
    discard: Literal["new", "old"] = "new"
    replicas: int = limit(1, min=1, max=5)
    storage: Literal["file", "memory"] = "file"


@typed
class BusConfig(Struct):
    url: str = limit("nats://127.0.0.1:4222", max_len=1024)
    # NATS user and a file holding its password (a nats-server with authorization: kvrelay up --tenants
    # writes one per service, mode 0600, in the run folder); "" = no authentication
    user: str = limit("", max_len=256)
    password_file: str = limit("", max_len=4096)
    namespace: str = limit("default", max_len=64)
    connect_timeout_s: float = limit(5.0, min=0.1, max=120.0)
    request_timeout_s: float = limit(2.0, min=0.05, max=60.0)
    # liveness: workers re-put their record every heartbeat; the bucket forgets it after ttl
    # (the router also ends the streams of a worker it no longer sees: router/watch.py)
    heartbeat_s: float = limit(0.5, min=0.1, max=60.0)
    worker_ttl_s: float = limit(3.0, min=1.0, max=600.0)
    # per-subscription inbound bound (nats-py drops and reports a slow consumer past it)
    pending_msgs_limit: int = limit(65536, min=16)
    pending_bytes_limit: int = limit(256 << 20, min=1 << 16)
    requests: StreamLimits = StreamLimits(max_msgs=10_000, max_bytes=256 << 20, max_age_s=300.0)
    prefilled: StreamLimits = StreamLimits(max_msgs=4096, max_bytes=256 << 20, max_age_s=120.0)
    kv_events: StreamLimits = StreamLimits(
        max_msgs=100_000, max_bytes=128 << 20, max_age_s=600.0, discard="old", storage="memory"
    )

    def validate(self) -> None:
        try:
            check_token(self.namespace, "namespace")
        except ValueError as exc:
            raise ValidationError("bus.namespace", str(exc)) from exc
        if not self.url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ValidationError("bus.url", f"{self.url!r} is not a nats:// URL")
        if self.worker_ttl_s < 2 * self.heartbeat_s:
            raise ValidationError("bus.worker_ttl_s", "must be at least twice heartbeat_s")
