"""Router configuration: the router's section, and what a router process reads."""

from __future__ import annotations

from typing import Literal

from kvrelay.schemas.hashing import CacheConfig
from kvrelay.schemas.struct import Struct, limit, typed
from kvrelay.transport.config import BusConfig


@typed
class ChatConfig(Struct):
    """Tools, reasoning and structured outputs on chat requests (router/chat_parsing.py): vLLM's own
    parsers, named as vLLM's server names them."""

    # vLLM's --tool-call-parser name (hermes, llama3_json, openai, ...); with one, tool_choice "auto"
    # works; "" = none. "auto": the parser of the model `kvrelay` prepared (hermes for smollm2/tiny),
    # resolved by the kvrelay command; a router given a folder reads "auto" as none
    tool_call_parser: str = limit("auto", max_len=64)
    reasoning_parser: str = limit("", max_len=64)  # vLLM's --reasoning-parser name; "" = none
    # "" = the model's own template; a built-in name (router/chat_templates.py); or a .jinja file.
    # "auto": as for tool_call_parser (chatml-tools for smollm2/tiny)
    chat_template: str = limit("auto", max_len=4096)
    # vLLM's --tool-strict-level: "parameter" pins every tool's arguments to its JSON schema with
    # structured outputs (a call always validates); "function" constrains the call's envelope only;
    # "auto" constrains required / named choices and tools marked strict
    tool_strict_level: Literal["auto", "function", "parameter"] = "parameter"
    # JSON without runs of whitespace, in response_format outputs (xgrammar's disable_any_whitespace)
    # and tool-call arguments (at most one blank in a row): a small model at a high temperature cannot
    # then spend its tokens on blanks
    compact_json: bool = False
    # vLLM's --exclude-tools-when-tool-choice-none: with tool_choice "none" the template is not given the
    # tools. Off (vLLM's default): an agent's final answer then shares its prompt prefix (the tools
    # are in the system turn) with its tool-calling steps, a prefix-cache hit
    exclude_tools_when_tool_choice_none: bool = False


@typed
class RouterConfig(Struct):
    router_id: str = limit("", max_len=64)  # "" = generated from host and pid
    # publish dispatch-time load to other router replicas and count theirs (router/shared_inflight.py)
    share_inflight: bool = True
    http_host: str = limit("127.0.0.1", max_len=256)
    http_port: int = limit(8000, min=0, max=65535)
    # the tokenizer (and chat template) of the served model: a model folder
    model: str = limit("", max_len=4096)
    served_model_name: str = limit("", max_len=256)
    # kv_aware (the default) routes by prefix-cache overlap and load; the others ignore the cache
    policy: Literal["least_loaded", "round_robin", "kv_aware"] = "kv_aware"
    # requests held by this router, from arrival to the last token, those waiting for a worker
    # included; past it new requests get 429
    max_inflight: int = limit(1024, min=1)
    # requests waiting for a prefill worker with room (router/admission.py) until their first-token
    # deadline (then 504); past it 429. 0: no waiting, a request every worker refuses gets 429
    max_waiting: int = limit(512, min=0)
    # the order they are placed in: "fair", weighted fair sharing of tokens between tenants (VTC,
    # router/fair_queue.py; weights from the tenants file, 1 without); "fifo", first come first served
    admission_order: Literal["fair", "fifo"] = "fair"
    # without a capacity signal the head of that queue retries after a back-off doubling up to this
    admission_max_backoff_s: float = limit(1.0, min=0.01, max=60.0)
    max_prompt_tokens: int = limit(32768, min=1)
    max_body_bytes: int = limit(4 << 20, min=1024)
    default_max_tokens: int = limit(256, min=1)
    # every request has a deadline: the client's timeout, capped by this
    request_timeout_s: float = limit(300.0, min=0.1, max=86400.0)
    first_token_timeout_s: float = limit(120.0, min=0.1, max=86400.0)
    dispatch_timeout_s: float = limit(2.0, min=0.05, max=60.0)
    # while no prefill worker is live (a restart, a scale-up), a request waits this long in the admission
    # queue for one to join before it gets 503; 0 = 503 at once
    no_worker_wait_s: float = limit(10.0, min=0.0, max=3600.0)
    # a started stream with no chunk for this long ends with an error (router/watch.py)
    stream_stall_timeout_s: float = limit(30.0, min=0.1, max=86400.0)
    # how often every flight's worker is checked against discovery and the stall timeout
    watch_interval_s: float = limit(0.5, min=0.01, max=60.0)
    # token chunks held per request while put back in order; past it the request fails
    max_buffered_chunks: int = limit(4096, min=16, max=1 << 20)
    # NATS intake (pub/sub clients): requests pulled at once from the request stream
    intake_enabled: bool = True
    intake_max_inflight: int = limit(64, min=1)
    # a request no worker can take yet goes back to the stream for this long (until its deadline)
    intake_retry_delay_s: float = limit(0.5, min=0.01, max=60.0)
    # a fetched request not acknowledged in this time is redelivered (router replica died)
    intake_ack_wait_s: float = limit(30.0, min=1.0, max=3600.0)
    default_tenant: str = limit("default", max_len=64)
    # tenants (schemas/tenants.py): API keys, quotas; re-read when it changes. "" = an open server
    # (every client is default_tenant or names one in X-Kvrelay-Tenant)
    tenants_file: str = limit("", max_len=4096)
    # kv_aware policy (router/kv_policy.py): cost = kv_w_prefill * uncached prompt tokens
    # + kv_w_queue * (queued + in-flight prefill tokens) + kv_w_decode * active requests
    kv_w_prefill: float = limit(1.0, min=0.0, max=1e6)
    kv_w_queue: float = limit(1.0, min=0.0, max=1e6)
    kv_w_decode: float = limit(32.0, min=0.0, max=1e9)
    kv_temperature: float = limit(0.0, min=0.0, max=100.0)  # 0 = cheapest, ties random
    kv_max_fallbacks: int = limit(3, min=0, max=64)
    # local prefill (a decode worker computes the prompt itself): the most uncached prompt tokens it
    # may compute. "threshold" decider: local exactly when the session's decode worker (or one holding
    # more of the prompt than every prefill worker) leaves at most this many uncached
    kv_local_threshold_tokens: int = limit(256, min=0)
    # dispatch local-prefill plans to decode workers (kvrelay.<ns>.local.<worker>); off: never
    kv_local_prefill: bool = True
    # the P/D decider (router/pd_decider.py: remote or local prefill, per request with a decode worker to
    # offer it to). "adaptive": local when the prefill path (its queue, the prompt, the hop) would take
    # longer than a decode worker with room (its own local backlog, plus the stall its running streams
    # suffer), sessions or not; "threshold": the load-blind rule above
    pd_decider: Literal["adaptive", "threshold"] = "adaptive"
    # adaptive, all in prefill-token time: at most this many uncached tokens always go local (llm-d's
    # P/D decider skips the prefill stage under 16)
    pd_always_local_tokens: int = limit(16, min=0, max=1 << 20)
    # the remote path's fixed hop: dispatch, export, work queue, KV fetch and first decode step (about
    # 200 ms on the CPU benchmark, where a prompt token takes 0.7 ms: ~290; a few ms on GPUs)
    pd_remote_overhead_tokens: float = limit(128.0, min=0.0, max=1e9)
    # moving one prompt token's KV, per token (shm on CPU: ~0.002; RDMA on GPUs: ~0.05)
    pd_transfer_token_cost: float = limit(0.02, min=0.0, max=1e3)
    # a prompt token computed on the decode worker, against one on a prefill worker (same device: 1)
    pd_local_token_cost: float = limit(1.0, min=0.0, max=1e3)
    # the weight of what a local prefill costs the decode worker's running streams: each waits about
    # its uncached tokens' time (0: ignore them; disaggregation exists to spare them)
    pd_w_interference: float = limit(0.5, min=0.0, max=1e6)
    # keep a session's step KV on its decode worker this long for its next step (a tool call's pause),
    # unless the request says (kv_ttl_s); 0 = only when asked. Decode workers cap and budget it
    kv_ttl_s: float = limit(0.0, min=0.0, max=3600.0)
    # sessions (client session_id -> the decode worker of its last step) kept; LRU eviction past it
    max_sessions: int = limit(65536, min=1, max=1 << 24)
    # the prefix index (router/index.py): distinct block hashes kept (LRU eviction past it)
    kv_index_max_blocks: int = limit(1 << 20, min=1, max=1 << 28)
    kv_index_max_workers: int = limit(1024, min=1, max=65536)
    # a stale worker's snapshot must arrive within this, or it is asked again
    kv_snapshot_timeout_s: float = limit(5.0, min=0.1, max=600.0)
    chat: ChatConfig = ChatConfig()


@typed
class RouterProcessConfig(Struct):
    """Everything a router process reads: the bus, the deployment's cache contract and the router's
    section. The root config composes this; a router never sees the engines' sections. ``router.model``
    is a model folder here (the ``kvrelay`` command resolves names such as ``smollm2``)."""

    bus: BusConfig = BusConfig()
    cache: CacheConfig = CacheConfig()
    router: RouterConfig = RouterConfig()
