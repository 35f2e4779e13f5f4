"""The built-in chatml-tools template (SmolLM2's ChatML + Hermes tools) and the history the router
renders with it: tool-call arguments as sent, or as objects for a model's own template. No vLLM here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrelay import models
from kvrelay.router.chat_parsing import ChatFeatures, tool_call_arguments_as_objects
from kvrelay.router.chat_templates import BUILTIN, CHATML_TOOLS, ChatTemplateError, load_template
from kvrelay.router.config import ChatConfig
from kvrelay.router.errors import BadRequest
from kvrelay.router.openai_api import parse
from kvrelay.router.tokenizer import RouterTokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _call(args: object, name: str = "get_weather", cid: str = "call_1") -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


@pytest.fixture(scope="module")
def smol() -> Iterator[RouterTokenizer]:
    tok = RouterTokenizer.load_sync(models.resolve("smollm2"))
    yield tok
    tok.close()


# --- plain chats: SmolLM2's own rendering -------------------------------------------------------------
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}],
    [{"role": "user", "content": "a\n\nb "}, {"role": "assistant", "content": " x\n"},
     {"role": "user", "content": ""}],
], ids=["user", "system", "multi-turn", "odd-whitespace"])
def test_chatml_tools_renders_plain_chats_as_smollm2s_own_template(smol: RouterTokenizer,
                                                                   messages: list) -> None:
    assert smol.render_chat(messages, None, CHATML_TOOLS) == smol.render_chat(messages)
    assert smol.encode_chat_sync(messages, None, CHATML_TOOLS) == smol.encode_chat_sync(messages)


def test_chatml_tools_lists_the_tools_in_the_system_turn(smol: RouterTokenizer) -> None:
    text = smol.render_chat([{"role": "user", "content": "Hi"}], [WEATHER, ADD], CHATML_TOOLS)
    assert text == (
        DEFAULT_SYSTEM + "\n\nYou may call one or more functions to assist with the user query. "
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER["function"]) + "\n" + json.dumps(ADD["function"]) + "\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own = smol.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                           [WEATHER], CHATML_TOOLS)
    assert own.startswith("<|im_start|>system\nBe brief.\n\nYou may call")
    assert own.count("<|im_start|>system") == 1


def test_chatml_tools_renders_tool_calls_with_their_arguments_as_sent(smol: RouterTokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            _call('{"city":  "Paris" }'), _call('{"a": 1}', "add", "call_2")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "1"},
        {"role": "assistant", "content": None, "tool_calls": [_call({"city": "Rome"})]},
    ]
    text = smol.render_chat(messages, [WEATHER], CHATML_TOOLS)
    assert text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nChecking."
        '<tool_call>\n{"name": "get_weather", "arguments": {"city":  "Paris" }}\n</tool_call>'
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n1\n</tool_response><|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
        "</tool_call><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("content", ["", "Let me check."])
def test_chatml_tools_next_step_extends_the_last_prompt_with_the_models_output(smol: RouterTokenizer,
                                                                                content: str) -> None:
    """What agents rely on: the history after a tool call renders as the last prompt + the text the
    model wrote + its end token, token for token (a prefix-cache hit for the whole last step)."""
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    prompt = smol.encode_chat_sync(history, [WEATHER], CHATML_TOOLS)
    output = content + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    output_ids = smol.hf.encode(output, add_special_tokens=False)
    step = history + [{"role": "assistant", "content": content, "tool_calls": [_call('{"city": "Paris"}')]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    text = smol.render_chat(step, [WEATHER], CHATML_TOOLS)
    assert text.startswith(smol.render_chat(history, [WEATHER], CHATML_TOOLS) + output + "<|im_end|>")
    ids = smol.encode_chat_sync(step, [WEATHER], CHATML_TOOLS)
    assert ids[:len(prompt) + len(output_ids) + 1] == prompt + output_ids + list(smol.eos_token_ids)


# --- which template ----------------------------------------------------------------------------------
def test_load_template_reads_builtins_and_files(tmp_path: Path) -> None:
    assert load_template("") is None
    assert load_template("chatml-tools") == CHATML_TOOLS == BUILTIN["chatml-tools"]
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_template(str(tmp_path / "t.jinja")) == "{{ messages[0]['content'] }}"
    with pytest.raises(ChatTemplateError, match="not one of \\['chatml-tools'\\]"):
        load_template(str(tmp_path / "missing.jinja"))


# --- tool-call arguments in the history ---------------------------------------------------------------
def test_tool_call_arguments_as_objects_parses_json_object_texts() -> None:
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    _call('{"city": "Paris", "days": [1, 2]}'), _call("{}", "add", "call_2")]}]
    out = tool_call_arguments_as_objects(messages)
    args = [c["function"]["arguments"] for c in out[1]["tool_calls"]]
    assert args == [{"city": "Paris", "days": [1, 2]}, {}]
    assert out[1]["tool_calls"][0] == _call({"city": "Paris", "days": [1, 2]})
    assert out[0] is messages[0]
    assert messages[1]["tool_calls"][0] == _call('{"city": "Paris", "days": [1, 2]}')  # not mutated


@pytest.mark.parametrize("args", ["not json", '{"city": ', "[1, 2]", '"Paris"', "3", "null", ""])
def test_tool_call_arguments_as_objects_keeps_other_text(args: str) -> None:
    messages = [{"role": "assistant", "content": "", "tool_calls": [_call(args)]}]
    assert tool_call_arguments_as_objects(messages) == messages


def test_tool_call_arguments_as_objects_leaves_messages_without_calls_untouched() -> None:
    messages = [{"role": "user", "content": "{}"}, {"role": "assistant", "content": "x", "tool_calls": []},
                {"role": "tool", "tool_call_id": "c", "content": '{"a": 1}'},
                {"role": "assistant", "content": "y"}]
    out = tool_call_arguments_as_objects(messages)
    assert out == messages and all(a is b for a, b in zip(out, messages))


@pytest.mark.parametrize("template, as_objects", [("chatml-tools", False), ("", True), ("auto", True)])
def test_chat_features_history_keeps_text_for_builtin_templates_only(template: str, as_objects: bool) -> None:
    features = ChatFeatures(ChatConfig(tool_call_parser="", chat_template=template), tokenizer=None)
    call = {"role": "assistant", "content": "", "tool_calls": [_call('{"city": "Paris"}')]}
    history = features.history([call])
    assert history[0]["tool_calls"][0]["function"]["arguments"] == ({"city": "Paris"} if as_objects
                                                                      else '{"city": "Paris"}')
    assert (features.template is None) == (template != "chatml-tools")


# --- the request's history, as openai_api reads it ----------------------------------------------------
def test_openai_api_parse_keeps_tool_calls_and_tool_call_ids() -> None:
    body = {"model": "m", "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"P"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"}]}
    messages = parse("chat", body).messages
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [_call('{"city":"P"}')]}
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1",
                           "name": "get_weather"}


@pytest.mark.parametrize("calls, param", [
    ("x", "messages[1].tool_calls"),
    ([{"id": "c", "function": {"arguments": "{}"}}], "messages[1].tool_calls[0]"),
    ([{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}],
     "messages[1].tool_calls[0].function.arguments"),
])
def test_openai_api_parse_bad_tool_calls_are_400s_naming_the_field(calls: object, param: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "", "tool_calls": calls}]}
    with pytest.raises(BadRequest) as err:
        parse("chat", body)
    assert err.value.param == param and param in err.value.message
