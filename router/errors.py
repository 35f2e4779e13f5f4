"""Router errors: each one is what a client is told, with its HTTP status and OpenAI error shape.

    RouterError                 500 server_error
    ├── BadRequest              400 invalid_request_error (bad JSON, wrong type, out of range, ...)
    │   └── ContextTooLong      400 context_length_exceeded
    ├── Unauthorized            401 missing or unknown API key (tenants configured)
    ├── PermissionDenied        403 a key claiming another tenant, a stream subject outside the tenant's
    ├── ModelNotFound           404 model_not_found
    ├── PayloadTooLarge         413 request body over router.max_body_bytes
    ├── Overloaded              429 router at max_inflight or its admission queue full (router/admission.py)
    │   └── QuotaExceeded       429 the tenant's in-flight or tokens-per-minute quota (router/tenants.py)
    ├── NoWorkersAvailable      503 no live prefill worker
    ├── DeadlineExceeded        504 no first token / no end before the request's deadline
    ├── Cancelled               499 a Cancel for the request was seen on the bus
    └── UpstreamError           a worker's error chunk, with the status the worker gave it

The NATS intake sends the same errors as a final ``TokenChunk`` with ``ErrorInfo``.
"""

from __future__ import annotations

from kvrelay.schemas.messages import ErrorInfo


class RouterError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    # the ErrorInfo.code used on the bus (overloaded, invalid, timeout, ...)
    bus_code = "internal"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.bus_code, message=self.message[:4096], status=self.status)


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"
    bus_code = "invalid"


class ContextTooLong(BadRequest):
    code = "context_length_exceeded"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    bus_code = "unauthorized"


class PermissionDenied(RouterError):
    status = 403
    type = "permission_error"
    code = "permission_denied"
    bus_code = "forbidden"


class ModelNotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"
    bus_code = "invalid"


class PayloadTooLarge(RouterError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    bus_code = "invalid"


class Overloaded(RouterError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"
    bus_code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kw: object) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **kw)  # type: ignore[arg-type]


class QuotaExceeded(Overloaded):
    """The tenant is over one of its quotas; ``code`` says which (``tenant_max_inflight``,
    ``tenant_tokens_per_minute``)."""

    bus_code = "quota"


class NoWorkersAvailable(RouterError):
    status = 503
    type = "service_unavailable_error"
    code = "no_workers"
    bus_code = "unavailable"


class DeadlineExceeded(RouterError):
    status = 504
    type = "timeout_error"
    code = "timeout"
    bus_code = "timeout"


class StreamStalled(DeadlineExceeded):
    """No token of a started stream arrived within ``router.stream_stall_timeout_s``."""

    code = "stream_stalled"


class WorkerLost(RouterError):
    """The worker serving the request is gone (it left discovery, or its heartbeats stopped)."""

    status = 503
    type = "service_unavailable_error"
    code = "worker_lost"
    bus_code = "worker_lost"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=1.0)


class Cancelled(RouterError):
    """Someone published a Cancel for this request (a NATS client, an operator)."""

    status = 499
    type = "cancelled_error"
    code = "cancelled"
    bus_code = "cancelled"


class UpstreamError(RouterError):
    """A worker ended the request with an error chunk; keeps the worker's status and code."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message or "the worker failed the request", code=info.code or "engine")
        self.status = info.status
        self.bus_code = info.code or "engine"
        self.type = {400: "invalid_request_error", 429: "rate_limit_error", 504: "timeout_error"}.get(
            info.status, "server_error")
        self.retry_after_s = 1.0 if info.status in (429, 503) else None
