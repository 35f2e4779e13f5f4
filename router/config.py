"""Router configuration."""

from __future__ import annotations

from typing import Literal

from kvrelay.schemas.struct import Struct, limit, typed


@typed
class RouterConfig(Struct):
    router_id: str = limit("", max_len=64)  # "" = generated from host and pid
    http_host: str = limit("127.0.0.1", max_len=256)
    http_port: int = limit(8000, min=0, max=65535)
    # the tokenizer (and chat template) of the served model: a model folder
    model: str = limit("", max_len=4096)
    served_model_name: str = limit("", max_len=256)
    policy: Literal["least_loaded", "round_robin", "kv_aware"] = "least_loaded"
    # requests in flight through this router; past it new requests get 429
    max_inflight: int = limit(256, min=1)
    max_prompt_tokens: int = limit(32768, min=1)
    max_body_bytes: int = limit(4 << 20, min=1024)
    default_max_tokens: int = limit(256, min=1)
    # every request has a deadline: the client's timeout, capped by this
    request_timeout_s: float = limit(300.0, min=0.1, max=86400.0)
    first_token_timeout_s: float = limit(120.0, min=0.1, max=86400.0)
    dispatch_timeout_s: float = limit(2.0, min=0.05, max=60.0)
    # NATS intake (pub/sub clients): requests pulled at once from the request stream
    intake_enabled: bool = True
    intake_max_inflight: int = limit(64, min=1)
    default_tenant: str = limit("default", max_len=64)
    # block hashes are salted per tenant with this server-side secret (cache-timing side channel)
    tenant_salt_secret: str = limit("", max_len=256)
