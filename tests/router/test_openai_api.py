"""Request validation: OpenAI bodies -> ParsedRequest, or a typed 4xx error naming the field."""

from __future__ import annotations

import pytest

from kvrelay.router.errors import BadRequest, ContextTooLong
from kvrelay.router.openai_api import fit_lengths, parse

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_parse_chat_reads_every_supported_parameter() -> None:
    body = CHAT | {"max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 40, "seed": 3,
                   "stop": "\n", "stream": True, "stream_options": {"include_usage": True}, "user": "u",
                   "ignore_eos": True, "n": 1, "frequency_penalty": 0.2, "logit_bias": {}}
    p = parse("chat", body)
    assert p.messages == [{"role": "user", "content": "hi"}]
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (7, 0.0, 0.5, 40, 3, ("\n",))
    assert p.stream and p.include_usage and p.ignore_eos and p.user == "u"
    s = p.sampling(10, 100, 50, 16)
    assert (s.max_tokens, s.temperature, s.top_k, s.stop) == (7, 0.0, 40, ["\n"])


def test_parse_chat_takes_text_parts_and_null_assistant_content() -> None:
    body = {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "name": "x"}]}
    assert parse("chat", body).messages == [{"role": "user", "content": "a\nb"},
                                            {"role": "assistant", "content": "", "name": "x"}]


def test_parse_null_means_unset_and_max_tokens_is_an_alias() -> None:
    p = parse("chat", CHAT | {"temperature": None, "stop": None, "seed": None, "max_tokens": 5})
    assert (p.temperature, p.stop, p.seed, p.max_tokens) == (1.0, (), None, 5)


@pytest.mark.parametrize("prompt, text, ids", [
    ("hello", "hello", None),
    (["hello"], "hello", None),
    ([1, 2, 3], None, [1, 2, 3]),
    ([[4, 5]], None, [4, 5]),
])
def test_parse_completion_prompt_forms(prompt, text, ids) -> None:
    p = parse("completions", {"model": "m", "prompt": prompt})
    assert (p.prompt, p.prompt_token_ids) == (text, ids)


@pytest.mark.parametrize("api, body, param, code", [
    ("chat", [], None, "invalid_type"),
    ("chat", {"model": "m"}, "messages", "missing_required_parameter"),
    ("chat", {"messages": CHAT["messages"]}, "model", "missing_required_parameter"),
    ("chat", CHAT | {"model": 5}, "model", "invalid_type"),
    ("chat", CHAT | {"messages": "hi"}, "messages", "invalid_type"),
    ("chat", CHAT | {"messages": []}, "messages", "invalid_value"),
    ("chat", CHAT | {"messages": ["hi"]}, "messages[0]", "invalid_type"),
    ("chat", CHAT | {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ("chat", CHAT | {"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ("chat", CHAT | {"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "invalid_type"),
    ("chat", CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "invalid_value"),
    ("chat", CHAT | {"max_tokens": "10"}, "max_tokens", "invalid_type"),
    ("chat", CHAT | {"max_tokens": 0}, "max_tokens", "invalid_value"),
    ("chat", CHAT | {"max_tokens": 1.5}, "max_tokens", "invalid_type"),
    ("chat", CHAT | {"max_completion_tokens": True}, "max_completion_tokens", "invalid_type"),
    ("chat", CHAT | {"temperature": -1}, "temperature", "invalid_value"),
    ("chat", CHAT | {"temperature": True}, "temperature", "invalid_type"),
    ("chat", CHAT | {"temperature": "hot"}, "temperature", "invalid_type"),
    ("chat", CHAT | {"top_p": 0}, "top_p", "invalid_value"),
    ("chat", CHAT | {"top_p": 1.5}, "top_p", "invalid_value"),
    ("chat", CHAT | {"top_k": -2}, "top_k", "invalid_value"),
    ("chat", CHAT | {"seed": -1}, "seed", "invalid_value"),
    ("chat", CHAT | {"n": 2}, "n", "invalid_value"),
    ("chat", CHAT | {"stop": 5}, "stop", "invalid_type"),
    ("chat", CHAT | {"stop": ["a"] * 9}, "stop", "invalid_value"),
    ("chat", CHAT | {"stop": [""]}, "stop", "invalid_value"),
    ("chat", CHAT | {"stream": "yes"}, "stream", "invalid_type"),
    ("chat", CHAT | {"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ("chat", CHAT | {"stream": True, "stream_options": []}, "stream_options", "invalid_type"),
    ("chat", CHAT | {"user": 1}, "user", "invalid_type"),
    ("completions", {"model": "m"}, "prompt", "missing_required_parameter"),
    ("completions", {"model": "m", "prompt": ["a", "b"]}, "prompt", "invalid_value"),
    ("completions", {"model": "m", "prompt": [1, "a"]}, "prompt", "invalid_type"),
    ("completions", {"model": "m", "prompt": []}, "prompt", "invalid_type"),
    ("completions", {"model": "m", "prompt": [-1]}, "prompt", "invalid_value"),
    ("completions", {"model": "m", "prompt": 12}, "prompt", "invalid_type"),
])
def test_parse_rejects_bad_input_naming_the_field(api, body, param, code) -> None:
    with pytest.raises(BadRequest) as err:
        parse(api, body)
    assert err.value.status == 400
    assert (err.value.param, err.value.code) == (param, code)
    assert err.value.message


def test_fit_lengths_defaults_to_what_the_context_leaves() -> None:
    assert fit_lengths(10, None, 100, 50, 16) == 16
    assert fit_lengths(95, None, 100, 100, 16) == 5
    assert fit_lengths(10, 90, 100, 50, 16) == 90
    assert fit_lengths(10, None, None, 50, 16) == 16


@pytest.mark.parametrize("prompt, max_tokens, code", [
    (0, None, "invalid_value"),
    (51, None, "context_length_exceeded"),  # over max_prompt_tokens
    (100, None, "context_length_exceeded"),  # fills the context
    (10, 91, "context_length_exceeded"),  # prompt + max_tokens over the context
])
def test_fit_lengths_rejects_what_does_not_fit(prompt, max_tokens, code) -> None:
    with pytest.raises(BadRequest) as err:
        fit_lengths(prompt, max_tokens, 100, 50, 16)
    assert err.value.code == code
    assert isinstance(err.value, ContextTooLong) == (code == "context_length_exceeded")
