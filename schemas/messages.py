"""Every message on the bus. Field limits here are the validation applied on receipt.

Times on the wire are unix epoch milliseconds (``*_ms``) so any language can read them.
Token ids are plain ints. See README "Bus protocol" for subjects and flows.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from kvrelay.schemas.codec import Message, message
from kvrelay.schemas.errors import ValidationError
from kvrelay.schemas.struct import Struct, limit

MAX_PROMPT_TOKENS = 131072
MAX_STOP = 8
MAX_ID_LEN = 128
MAX_SUBJECT_LEN = 256
MAX_SESSION_LEN = 128
MAX_KV_TTL_MS = 3_600_000
_SESSION_CHARS = re.compile(r"^[\x21-\x7e]*$")  # visible ASCII, no spaces


def check_session_id(value: object, what: str = "session_id") -> str:
    """A client's conversation / agent session id: "" (none) or 1-128 visible ASCII characters."""
    if not isinstance(value, str):
        raise ValidationError(what, f"must be a string, got {type(value).__name__}")
    if len(value) > MAX_SESSION_LEN or not _SESSION_CHARS.match(value):
        raise ValidationError(what, f"must be at most {MAX_SESSION_LEN} visible ASCII characters (no spaces)")
    return value

# "tool_calls": only on chunks the router relays after parsing tool calls (never from a worker)
FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]


MAX_GRAMMAR_CHARS = 1 << 20


@message
class StructuredSpec(Struct):
    """A constraint on the output (vLLM's ``StructuredOutputsParams``), set by the router from
    ``response_format`` or ``tools``. Exactly one of the constraints is set; ``json`` and
    ``structural_tag`` are JSON texts. Every engine that samples a token of the request applies it:
    the prefill worker for the first token, a decode worker (its grammar advanced over the tokens
    already produced) for the rest."""

    json: str | None = limit(None, max_len=MAX_GRAMMAR_CHARS)  # a JSON schema, as JSON text
    json_object: bool = False
    regex: str | None = limit(None, max_len=MAX_GRAMMAR_CHARS)
    choice: list[str] | None = limit(None, max_len=1024)
    grammar: str | None = limit(None, max_len=MAX_GRAMMAR_CHARS)  # EBNF / Lark
    structural_tag: str | None = limit(None, max_len=MAX_GRAMMAR_CHARS)  # xgrammar structural tag, JSON
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def validate(self) -> None:
        given = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None, self.structural_tag is not None]
        if sum(given) != 1:
            raise ValidationError("StructuredSpec", "set exactly one of json, json_object, regex, choice, "
                                  "grammar, structural_tag")


@message
class SamplingSpec(Struct):
    max_tokens: int = limit(16, min=1, max=65536)
    temperature: float = limit(1.0, min=0.0, max=100.0)
    top_p: float = limit(1.0, min=0.0, max=1.0)
    top_k: int = limit(0, min=0, max=1 << 20)  # 0 = off
    seed: int | None = limit(None, min=0, max=(1 << 63) - 1)
    stop: list[str] = limit([], max_len=MAX_STOP)
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # False when a tool parser needs the special tokens in the text
    structured: StructuredSpec | None = None

    def validate(self) -> None:
        if self.top_p <= 0.0:
            raise ValidationError("top_p", "must be > 0")
        for s in self.stop:
            if not s or len(s) > 256:
                raise ValidationError("stop", "each stop string must be 1..256 characters")


@message
class FunctionCall(Struct):
    name: str = limit(max_len=256)
    arguments: str = limit("", max_len=1 << 20)  # JSON text, as OpenAI sends it


@message
class ToolCall(Struct):
    """A tool call of an assistant message in the history."""

    id: str = limit(max_len=256)
    type: Literal["function"] = "function"
    function: FunctionCall


@message
class FunctionSpec(Struct):
    name: str = limit(max_len=256)
    description: str = limit("", max_len=1 << 16)
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


@message
class ToolSpec(Struct):
    """A tool the model may call (OpenAI's function tool)."""

    type: Literal["function"] = "function"
    function: FunctionSpec


@message
class ChatMessage(Struct):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = limit("", max_len=1 << 20)
    tool_calls: list[ToolCall] | None = limit(None, max_len=128)  # assistant: the calls it made
    tool_call_id: str = limit("", max_len=256)  # tool: the call this answers
    name: str = limit("", max_len=256)


@message
class ToolCallDelta(Struct):
    """A piece of a tool call in a stream, as OpenAI streams them: the first piece of call ``index``
    has its ``id`` and ``name``; the pieces of ``arguments`` concatenate to its JSON text."""

    index: int = limit(min=0, max=1024)
    id: str = limit("", max_len=256)
    name: str = limit("", max_len=256)
    arguments: str = limit("", max_len=1 << 20)


@message
class ClientRequest(Message):
    """A request from a NATS pub/sub client, published on ``kvrelay.<ns>.req.<tenant>``.

    Exactly one of ``messages`` (chat), ``prompt`` (text completion) or ``prompt_token_ids``
    is set. Tokens stream to ``stream_subject`` as ``TokenChunk`` messages.
    """

    TYPE = "ClientRequest"
    MAX_BYTES = 4 << 20

    request_id: str = limit(max_len=MAX_ID_LEN)
    stream_subject: str = limit(max_len=MAX_SUBJECT_LEN)
    model: str = limit("", max_len=256)
    messages: list[ChatMessage] | None = limit(None, max_len=4096)
    prompt: str | None = limit(None, max_len=4 << 20)
    prompt_token_ids: list[int] | None = limit(None, max_len=MAX_PROMPT_TOKENS)
    sampling: SamplingSpec = SamplingSpec()
    timeout_s: float = limit(120.0, min=0.1, max=3600.0)
    # a conversation or agent session: its next step may go to the decode worker that ran this
    # one (local prefill, no KV transfer); "" = none. Scoped per tenant by the router.
    session_id: str = limit("", max_len=MAX_SESSION_LEN)
    # keep this step's KV on its decode worker for the session's next step, up to this many seconds
    # (a tool call's pause; needs session_id); None = the router's default (router.kv_ttl_s)
    kv_ttl_s: float | None = limit(None, min=0.0, max=3600.0)
    # chat only, as in OpenAI's API (validated by the router with vLLM's request model): the chunks
    # then carry parsed ``tool_calls`` and ``reasoning`` (README "Tools, reasoning, structured outputs")
    tools: list[ToolSpec] | None = limit(None, max_len=128)
    tool_choice: str | dict[str, Any] | None = None  # "none", "auto", "required", {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None  # {"type": "json_object"} / {"type": "json_schema", ...}
    include_reasoning: bool = True

    def validate(self) -> None:
        check_session_id(self.session_id, "ClientRequest.session_id")
        given = [x is not None for x in (self.messages, self.prompt, self.prompt_token_ids)]
        if sum(given) != 1:
            raise ValidationError("ClientRequest", "set exactly one of messages, prompt, prompt_token_ids")
        if self.messages is not None and not self.messages:
            raise ValidationError("ClientRequest.messages", "must not be empty")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValidationError("ClientRequest.prompt_token_ids", "must not be empty")
        chat_only = self.tools or self.tool_choice is not None or self.response_format is not None
        if chat_only and self.messages is None:
            raise ValidationError("ClientRequest", "tools, tool_choice and response_format need messages")


@message
class PrefillTask(Message):
    """Router -> one prefill worker (``kvrelay.<ns>.prefill.<worker>``, request/reply)."""

    TYPE = "PrefillTask"
    MAX_BYTES = 4 << 20

    request_id: str = limit(max_len=MAX_ID_LEN)
    tenant: str = limit(max_len=64)
    prompt_token_ids: list[int] = limit(max_len=MAX_PROMPT_TOKENS)
    sampling: SamplingSpec
    stream_subject: str = limit(max_len=MAX_SUBJECT_LEN)
    deadline_ms: int = limit(min=0)
    router_id: str = limit("", max_len=MAX_ID_LEN)
    arrival_ms: int = limit(0, min=0)
    # the decode worker that should take this request (multi-step affinity); "" = any
    decode_hint: str = limit("", max_len=MAX_ID_LEN)
    # wall-clock ms after which the worker must refuse the offer (code "timeout") instead of
    # starting it: the router has stopped waiting for the reply and may offer it elsewhere; 0 = none
    accept_by_ms: int = limit(0, min=0)
    # the client's session, scoped by tenant ("<tenant>/<session id>"; "" = none), and how long the
    # decode worker should keep this step's KV for the session's next step (0 = not asked)
    session: str = limit("", max_len=MAX_SESSION_LEN + 80)
    kv_ttl_ms: int = limit(0, min=0, max=MAX_KV_TTL_MS)
    # leading prompt tokens the router expects this worker to hold (its plan; 0 = unknown): what is
    # left is the work the worker schedules (prefill queue) and budgets (a decode worker's local prefill)
    cached_tokens: int = limit(0, min=0)

    def validate(self) -> None:
        if not self.prompt_token_ids:
            raise ValidationError("PrefillTask.prompt_token_ids", "must not be empty")

    @property
    def work_tokens(self) -> int:
        """Prompt tokens left to compute by the router's estimate (at least one: the last is always computed)."""
        n = len(self.prompt_token_ids)
        return n - min(self.cached_tokens, n - 1)


@message
class DispatchReply(Message):
    """Prefill worker -> router: the task was queued, or why not."""

    TYPE = "DispatchReply"

    accepted: bool
    reason: str = limit("", max_len=512)
    code: str = limit("", max_len=64)  # "", "overloaded", "invalid", "draining"
    queued_tokens: int = limit(0, min=0)


@message
class KVLayout(Struct):
    """How one block of KV is laid out: must match on both ends of a transfer."""

    num_layers: int = limit(min=1, max=1024)
    num_kv_heads: int = limit(min=1, max=1024)
    head_dim: int = limit(min=1, max=4096)
    block_size: int = limit(min=1, max=4096)
    dtype: str = limit(max_len=32)  # torch dtype name, e.g. "bfloat16"
    # elements per (block, layer): num_kv_heads * block_size * 2 * head_dim for vLLM's CPU layout
    page_elems: int = limit(min=1)
    layout: str = limit("cpu_nhbc", max_len=32)


@message
class KVDescriptor(Struct):
    """Where a finished prefill's KV lies and how to fetch it (no KV bytes ride on NATS)."""

    backend: Literal["shm", "tcp", "cuda-ipc", "nixl"]
    worker_id: str = limit(max_len=MAX_ID_LEN)
    host: str = limit(max_len=256)  # host identity: shm/cuda-ipc only within one host
    region: str = limit(max_len=256)  # shm segment name / cuda ipc handle id
    block_ids: list[int] = limit(max_len=1 << 16)  # blocks in the exporter's region
    num_tokens: int = limit(min=1)
    ticket: int = limit(min=1)  # names this export; reused blocks carry another ticket
    lease_expires_ms: int = limit(min=0)
    layout: KVLayout
    endpoint: str = limit("", max_len=256)  # tcp host:port of the worker's block server
    checksum: int | None = None  # crc32 of the exported bytes, when integrity checks are on
    fallbacks: list[str] = limit([], max_len=8)  # other backends the exporter serves


@message
class PrefillDone(Message):
    """Prefill worker -> JetStream work queue ``kvrelay.<ns>.prefilled``; pulled by decode workers."""

    TYPE = "PrefillDone"
    MAX_BYTES = 4 << 20

    request_id: str = limit(max_len=MAX_ID_LEN)
    tenant: str = limit(max_len=64)
    prompt_token_ids: list[int] = limit(max_len=MAX_PROMPT_TOKENS)
    first_token_id: int = limit(min=0)
    sampling: SamplingSpec
    stream_subject: str = limit(max_len=MAX_SUBJECT_LEN)
    deadline_ms: int = limit(min=0)
    prefill_worker: str = limit(max_len=MAX_ID_LEN)
    kv: KVDescriptor
    prefill_ms: float = limit(0.0, min=0.0)
    cached_tokens: int = limit(0, min=0)
    decode_hint: str = limit("", max_len=MAX_ID_LEN)
    session: str = limit("", max_len=MAX_SESSION_LEN + 80)  # as in PrefillTask
    kv_ttl_ms: int = limit(0, min=0, max=MAX_KV_TTL_MS)


@message
class Usage(Struct):
    prompt_tokens: int = limit(0, min=0)
    completion_tokens: int = limit(0, min=0)
    cached_tokens: int = limit(0, min=0)


@message
class ErrorInfo(Struct):
    code: str = limit(max_len=64)  # overloaded, invalid, timeout, cancelled, engine, transfer, internal
    message: str = limit(max_len=4096)
    status: int = limit(500, min=400, max=599)  # the HTTP status it maps to


@message
class TokenChunk(Message):
    """Worker -> ``stream_subject``: part of one request's output, in order by ``seq``.

    ``seq`` starts at 0 (the prefill worker's first token) and grows by one per chunk.
    The last chunk has ``finish_reason`` set, and ``usage``; an error ends the stream
    with ``finish_reason="error"`` and ``error`` set.
    """

    TYPE = "TokenChunk"

    request_id: str = limit(max_len=MAX_ID_LEN)
    seq: int = limit(min=0)
    token_ids: list[int] = limit([], max_len=65536)
    text: str = ""  # the content (with a tool or reasoning parser on: the text the parser left)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    worker: str = limit("", max_len=MAX_ID_LEN)
    sent_ms: int = limit(0, min=0)
    # set by the router on requests it parses (tools, a reasoning parser): relayed to the client
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = limit([], max_len=128)


@message
class LeaseRelease(Message):
    """Decode worker -> ``kvrelay.<ns>.kv.release.<prefill worker>``: the blocks may be freed."""

    TYPE = "LeaseRelease"

    request_id: str = limit(max_len=MAX_ID_LEN)
    ticket: int = limit(min=1)
    reason: str = limit("done", max_len=64)


@message
class Cancel(Message):
    """Anyone -> ``kvrelay.<ns>.cancel.<request>``: stop this request wherever it is."""

    TYPE = "Cancel"

    request_id: str = limit(max_len=MAX_ID_LEN)
    reason: str = limit("cancelled", max_len=256)


@message
class WorkerInfo(Message):
    """A worker's record in the discovery KV bucket, re-put every heartbeat (TTL = liveness)."""

    TYPE = "WorkerInfo"

    worker_id: str = limit(max_len=MAX_ID_LEN)
    role: Literal["prefill", "decode", "both"]
    model: str = limit(max_len=256)
    host: str = limit(max_len=256)
    pid: int = limit(0, min=0)
    started_ms: int = limit(0, min=0)
    heartbeat_ms: int = limit(0, min=0)
    block_size: int = limit(min=1)
    hash_seed: str = limit("", max_len=64)
    backends: list[str] = limit([], max_len=8)
    max_slots: int = limit(1, min=0)
    active: int = limit(0, min=0)
    queued: int = limit(0, min=0)
    queued_tokens: int = limit(0, min=0)
    free_kv_blocks: int = limit(0, min=0)
    draining: bool = False
    # the engine's context (prompt + output tokens); routers check requests against it
    max_model_len: int = limit(0, min=0)
    # decode workers: the most local-prefill prompt tokens they take in flight (their ITL budget,
    # workers/local_budget.py; 0 = no budget beyond their slots); queued_tokens is what is in flight
    local_budget_tokens: int = limit(0, min=0)
