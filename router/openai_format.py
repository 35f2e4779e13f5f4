"""OpenAI-shaped responses: full completions, streaming chunks, usage, SSE framing. Pure.

Shapes follow the OpenAI API as the ``openai`` Python client parses them:
``chat.completion`` / ``chat.completion.chunk`` for chat, ``text_completion`` for completions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgspec

from kvrelay.router.openai_api import Api

SSE_DONE = b"data: [DONE]\n\n"

# worker finish reasons -> OpenAI's ("abort" and "error" never reach a successful response)
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def finish_reason(worker_reason: str | None) -> str | None:
    return None if worker_reason is None else _FINISH.get(worker_reason, "stop")


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


_encode_json = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Shaper:
    """Builds the response objects of one request."""

    api: Api
    request_id: str
    model: str
    created: int
    include_usage: bool = False

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.api == "chat" else "cmpl-") + self.request_id

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def full(self, text: str, reason: str | None, usage: dict[str, Any],
             message: dict[str, Any] | None = None) -> dict[str, Any]:
        """The non-streaming response (chat: ``message`` when parsed, else the text as content)."""
        if self.api == "chat":
            out = self._head("chat.completion")
            choice = {"index": 0, "message": message or {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason(reason)}
        else:
            out = self._head("text_completion")
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}
        out["choices"] = [choice]
        out["usage"] = usage
        return out

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.api == "chat" else "text_completion")
        out["choices"] = choices
        if self.include_usage:
            out["usage"] = None
        return out

    def _choice(self, text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.api == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason(reason)}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason(reason)}

    def opening(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role and empty content; completions do not."""
        return self._chunk([self._choice("", None, role=True)]) if self.api == "chat" else None

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk([self._choice(text, None)])

    def delta_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A chat chunk whose delta is ``fields`` (parsed content, reasoning, tool_calls)."""
        return self._chunk([{"index": 0, "delta": fields, "logprobs": None, "finish_reason": None}])

    def delta_sse(self, text: str) -> bytes:
        """``sse(self.delta(text))``, byte for byte in meaning, from a frame built once per request:
        only the text is encoded per token (the hot path of a stream)."""
        head, tail = self._delta_frame
        return head + _encode_json(text) + tail

    @cached_property
    def _delta_frame(self) -> tuple[bytes, bytes]:
        marker = "KVRELAY-TEXT-7f3a9c"  # plain ASCII: encoded alike by json and msgspec
        head, found, tail = sse(self.delta(marker)).partition(_encode_json(marker))
        if not found:
            raise RuntimeError("the delta frame does not hold its text")
        return head, tail

    def finish(self, reason: str | None) -> dict[str, Any]:
        return self._chunk([self._choice(None if self.api == "chat" else "", reason)])

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        """With ``stream_options.include_usage``: the last chunk, no choices, the usage."""
        out = self._chunk([])
        out["usage"] = usage
        return out
