"""Response shaping: every object the router sends parses with the official openai types."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from kvrelay.router.errors import Overloaded, UpstreamError
from kvrelay.router.openai_format import SSE_DONE, Shaper, finish_reason, sse, usage_dict
from kvrelay.schemas.messages import ErrorInfo

USAGE = usage_dict(10, 3, 4)


def test_format_chat_completion_parses_as_openai() -> None:
    body = Shaper("chat", "abc", "m", 1700000000).full("Hello", "length", USAGE)
    c = ChatCompletion.model_validate(body)
    assert (c.id, c.object, c.model) == ("chatcmpl-abc", "chat.completion", "m")
    assert c.choices[0].message.content == "Hello" and c.choices[0].message.role == "assistant"
    assert c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (10, 3, 13)
    assert c.usage.prompt_tokens_details.cached_tokens == 4


def test_format_text_completion_parses_as_openai() -> None:
    c = Completion.model_validate(Shaper("completions", "abc", "m", 1).full("Hi", "stop", USAGE))
    assert (c.id, c.object, c.choices[0].text, c.choices[0].finish_reason) == ("cmpl-abc", "text_completion",
                                                                              "Hi", "stop")


def test_format_chat_stream_chunks_parse_as_openai() -> None:
    s = Shaper("chat", "abc", "m", 1, include_usage=True)
    chunks = [ChatCompletionChunk.model_validate(o) for o in
              (s.opening(), s.delta("He"), s.delta("llo"), s.finish("stop"), s.usage_chunk(USAGE))]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:3]) == "Hello"
    assert chunks[3].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:4])
    assert chunks[4].choices == [] and chunks[4].usage.total_tokens == 13


def test_format_text_stream_chunks_parse_as_openai() -> None:
    s = Shaper("completions", "abc", "m", 1)
    assert s.opening() is None
    delta = s.delta("Hi")
    # mid-stream finish_reason is null, as OpenAI and vLLM send it (the client's stream does not
    # validate it; the pydantic type only allows the final values): check everything else
    assert delta["choices"][0]["finish_reason"] is None
    delta["choices"][0]["finish_reason"] = "stop"
    c = Completion.model_validate(delta)
    assert c.choices[0].text == "Hi" and "usage" not in s.delta("x")
    assert Completion.model_validate(s.finish("length")).choices[0].finish_reason == "length"


def test_format_finish_reasons_are_openai_values() -> None:
    assert [finish_reason(r) for r in ("stop", "length", None)] == ["stop", "length", None]


def test_format_sse_framing_and_error_bodies() -> None:
    frame = sse({"a": "é"})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == {"a": "é"}
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert Overloaded("busy").body() == {"error": {"message": "busy", "type": "rate_limit_error",
                                                    "param": None, "code": "overloaded"}}
    up = UpstreamError(ErrorInfo(code="engine", message="boom", status=503))
    assert (up.status, up.body()["error"]["code"], up.retry_after_s) == (503, "engine", 1.0)


@pytest.mark.parametrize("api", ["chat", "completions"])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", ["Hello", " world", "", 'quo"te \\ back', "line\nbreak\ttab", "naïve 東京 🙂",
                                  "\x00\x1f control", "</script>", "KVRELAY-TEXT"])
def test_format_delta_sse_is_the_same_event_as_the_dict_path(api: str, include_usage: bool, text: str) -> None:
    shaper = Shaper(api, "rid", "kvrelay-tiny", 1700000000, include_usage)
    fast, slow = shaper.delta_sse(text), sse(shaper.delta(text))
    assert fast.startswith(b"data: ") and fast.endswith(b"\n\n")
    assert json.loads(fast[6:]) == json.loads(slow[6:]) == shaper.delta(text)
    assert shaper.delta_sse(text) == fast  # the frame is built once and reused
