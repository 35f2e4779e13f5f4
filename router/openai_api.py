"""OpenAI-compatible request bodies -> a validated ``ParsedRequest``. Pure: no I/O.

Untrusted input is checked here, at the edge: every known field is type- and range-checked
(a wrong type is a 400 naming the field), unknown fields are ignored (OpenAI clients send
many), and only what kvrelay can honour is accepted (``n`` must be 1; message content must
be text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from kvrelay.router.errors import BadRequest, ContextTooLong
from kvrelay.schemas.errors import ValidationError
from kvrelay.schemas.messages import MAX_SESSION_LEN, MAX_STOP, SamplingSpec, check_session_id

Api = Literal["chat", "completions"]
ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_MESSAGES = 4096
MAX_MAX_TOKENS = 65536
MAX_SEED = (1 << 63) - 1
_MISSING = object()


@dataclass(frozen=True)
class ParsedRequest:
    """One validated completion request; exactly one of messages / prompt / prompt_token_ids is set."""

    api: Api
    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    user: str = ""
    session_id: str = ""  # extension: the client's session ("" = none), see router/sessions.py
    kv_ttl_s: float | None = None  # extension: keep the step's KV for the session's next step (None: default)

    def sampling(self, prompt_tokens: int, max_context: int | None, max_prompt_tokens: int,
                 default_max_tokens: int) -> SamplingSpec:
        """The sampling spec, after checking the prompt and its output fit (400 otherwise)."""
        max_tokens = fit_lengths(prompt_tokens, self.max_tokens, max_context, max_prompt_tokens,
                                 default_max_tokens)
        return SamplingSpec(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                            top_k=self.top_k, seed=self.seed, stop=list(self.stop), ignore_eos=self.ignore_eos)


def fit_lengths(prompt_tokens: int, max_tokens: int | None, max_context: int | None,
                max_prompt_tokens: int, default_max_tokens: int) -> int:
    """``max_tokens`` to use: the asked one if prompt + it fits the context, else ContextTooLong.

    Unset ``max_tokens`` means ``default_max_tokens``, shortened to what the context leaves.
    """
    if prompt_tokens < 1:
        raise BadRequest("the prompt is empty", param="prompt")
    if prompt_tokens > max_prompt_tokens:
        raise ContextTooLong(f"the prompt has {prompt_tokens} tokens, over this server's limit of "
                             f"{max_prompt_tokens}", param="messages")
    room = (max_context - prompt_tokens) if max_context else MAX_MAX_TOKENS
    if room < 1:
        raise ContextTooLong(f"the prompt has {prompt_tokens} tokens, which fills the model's context "
                             f"of {max_context} tokens", param="messages")
    if max_tokens is None:
        return max(1, min(default_max_tokens, room, MAX_MAX_TOKENS))
    if max_tokens > room:
        raise ContextTooLong(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over "
                             f"the model's context of {max_context} tokens", param="max_tokens")
    return max_tokens


# --- field readers: each raises BadRequest naming the field -------------------------------------------
def _type_error(name: str, expected: str, value: Any) -> BadRequest:
    got = "null" if value is None else type(value).__name__
    return BadRequest(f"'{name}' must be {expected}, got {got}", param=name, code="invalid_type")


def _opt(body: dict, name: str) -> Any:
    """The field's value, or _MISSING when absent or null (OpenAI clients send null for unset)."""
    value = body.get(name, _MISSING)
    return _MISSING if value is None else value


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = _opt(body, name)
    if value is _MISSING:
        return None
    if type(value) is not int:
        raise _type_error(name, "an integer", value)
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def _float(body: dict, name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    value = _opt(body, name)
    if value is _MISSING:
        return default
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _type_error(name, "a number", value)
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise BadRequest(f"'{name}' must be {bound} and <= {hi}, got {value}", param=name)
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = _opt(body, name)
    if value is _MISSING:
        return False
    if type(value) is not bool:
        raise _type_error(name, "a boolean", value)
    return value


def _str(body: dict, name: str, max_len: int, required: bool = False) -> str:
    value = _opt(body, name)
    if value is _MISSING:
        if required:
            raise BadRequest(f"'{name}' is required", param=name, code="missing_required_parameter")
        return ""
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    if len(value) > max_len:
        raise BadRequest(f"'{name}' is longer than {max_len} characters", param=name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = _opt(body, "stop")
    if value is _MISSING:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or a list of strings", value)
    if len(stops) > MAX_STOP:
        raise BadRequest(f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", param="stop")
    if any(not 1 <= len(s) <= 256 for s in stops):
        raise BadRequest("each 'stop' string must be 1 to 256 characters", param="stop")
    return tuple(stops)


def session_id(value: Any, name: str = "session_id") -> str:
    """A session id from the body or the header: "" or 1-128 visible ASCII characters (400 otherwise)."""
    if value is _MISSING:
        return ""
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    try:
        return check_session_id(value, name)
    except ValidationError as exc:
        raise BadRequest(f"'{name}' must be at most {MAX_SESSION_LEN} visible ASCII characters (no spaces)",
                         param=name) from exc


def _content(value: Any, i: int, role: str) -> str:
    name = f"messages[{i}].content"
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"'{name}': only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                 f"supported", param=name)
            texts.append(part["text"])
        return "\n".join(texts)
    raise _type_error(name, "a string or a list of text parts", value)


def _tool_calls(value: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``: ids, function names and JSON argument texts."""
    name = f"messages[{i}].tool_calls"
    if not isinstance(value, list) or len(value) > 128:
        raise _type_error(name, "a list of at most 128 tool calls", value)
    calls = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id", ""), str):
            raise BadRequest(f"'{name}[{j}]' must be {{\"id\": str, \"type\": \"function\", \"function\": "
                             f"{{\"name\": str, \"arguments\": str}}}}", param=f"{name}[{j}]")
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            raise _type_error(f"{name}[{j}].function.arguments", "a string (JSON text)", args)
        calls.append({"id": call.get("id", ""), "type": "function",
                      "function": {"name": fn["name"], "arguments": args}})
    return calls


def _message(m: dict, i: int, role: str) -> dict[str, Any]:
    out: dict[str, Any] = {"role": role, "content": _content(m.get("content"), i, role)}
    if role == "assistant" and m.get("tool_calls"):
        out["tool_calls"] = _tool_calls(m["tool_calls"], i)
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None:
            out[key] = _str(m, key, 256)
    return out


def _messages(body: dict) -> list[dict[str, Any]]:
    value = body.get("messages")
    if value is None:
        raise BadRequest("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(value, list):
        raise _type_error("messages", "a list", value)
    if not 1 <= len(value) <= MAX_MESSAGES:
        raise BadRequest(f"'messages' must hold 1 to {MAX_MESSAGES} messages", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _type_error(f"messages[{i}]", "an object", m)
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got {role!r}",
                             param=f"messages[{i}].role")
        if "content" not in m and role != "assistant":
            raise BadRequest(f"'messages[{i}].content' is required", param=f"messages[{i}].content",
                             code="missing_required_parameter")
        out.append(_message(m, i, role))
    return out


def _token_ids(value: list) -> list[int] | None:
    if value and all(type(t) is int for t in value):
        if any(t < 0 for t in value):
            raise BadRequest("token ids in 'prompt' must be >= 0", param="prompt")
        return value
    return None


def _prompt(body: dict) -> tuple[str | None, list[int] | None]:
    value = body.get("prompt")
    if value is None:
        raise BadRequest("'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
        if isinstance(value, str):
            return value, None
    if isinstance(value, list):
        ids = _token_ids(value)
        if ids is not None:
            return None, ids
        if len(value) > 1 and all(isinstance(v, (str, list)) for v in value):
            raise BadRequest("only one prompt per request is supported", param="prompt")
    raise _type_error("prompt", "a string, a list of one string, or a list of token ids", value)


def parse(api: Api, body: Any) -> ParsedRequest:
    """Validate a decoded JSON body for ``/v1/chat/completions`` (chat) or ``/v1/completions``."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_type")
    n = _int(body, "n", 1, 128)
    if n not in (None, 1):
        raise BadRequest("only n=1 is supported", param="n")
    stream = _bool(body, "stream")
    options = _opt(body, "stream_options")
    include_usage = False
    if options is not _MISSING:
        if not stream:
            raise BadRequest("'stream_options' is only allowed with stream=true", param="stream_options")
        if not isinstance(options, dict):
            raise _type_error("stream_options", "an object", options)
        include_usage = _bool(options, "include_usage")
    max_tokens = _int(body, "max_completion_tokens", 1, MAX_MAX_TOKENS)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, MAX_MAX_TOKENS)
    top_k = _int(body, "top_k", -1, 1 << 20)
    messages = prompt = ids = None
    if api == "chat":
        messages = _messages(body)
    else:
        prompt, ids = _prompt(body)
    return ParsedRequest(
        api=api, model=_str(body, "model", 256, required=True), messages=messages, prompt=prompt,
        prompt_token_ids=ids, max_tokens=max_tokens,
        temperature=_float(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_float(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        top_k=max(0, top_k or 0), seed=_int(body, "seed", 0, MAX_SEED), stop=_stop(body),
        ignore_eos=_bool(body, "ignore_eos"), stream=stream, include_usage=include_usage,
        user=_str(body, "user", 256), session_id=session_id(_opt(body, "session_id")),
        kv_ttl_s=None if _opt(body, "kv_ttl_s") is _MISSING else _float(body, "kv_ttl_s", 0.0, 3600.0, 0.0),
    )
