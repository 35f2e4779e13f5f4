"""make_plan: a chat body's tools, tool_choice and response_format validated by vLLM's request model and
turned into the request's constraint (a StructuredSpec on the wire) and template inputs; bad ones are 400s
naming the field. vLLM is imported once per module (~12 s)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from kvrelay import models
from kvrelay.router.chat_parsing import ChatFeatures, ChatPlan
from kvrelay.router.config import ChatConfig
from kvrelay.router.errors import BadRequest
from kvrelay.router.tokenizer import RouterTokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "CITY_PARAM"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
TOOLS = [WEATHER, ADD]
WEATHER_PARAMS, ADD_PARAMS = WEATHER["function"]["parameters"], ADD["function"]["parameters"]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris, and 1 + 2?"}]}
TOOL_CHAT = CHAT | {"tools": TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CALL_W = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
W_ARGS = '{"city": "Paris"}'


def loaded(tokenizer: Any, tool: str = "", reasoning: str = "", **cfg: Any) -> ChatFeatures:
    features = ChatFeatures(ChatConfig(tool_call_parser=tool, reasoning_parser=reasoning, **cfg), tokenizer)
    features._load_sync()
    return features


def plan_of(features: ChatFeatures, body: dict[str, Any]) -> ChatPlan:
    """``features.plan(body)`` without an event loop (the module's features outlive each test's loop)."""
    from kvrelay.router.chat_vllm import make_plan

    return make_plan(body, features._parser_cls, features.tokenizer, bool(features.tool_parser))


def _values(node: Any, key: str) -> Iterator[Any]:
    """Every value of ``key`` in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v, key)


@pytest.fixture(scope="module")
def smol() -> Iterator[RouterTokenizer]:
    tok = RouterTokenizer.load_sync(models.resolve("smollm2"))
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def hermes(smol: RouterTokenizer) -> ChatFeatures:
    return loaded(smol.hf, "hermes", chat_template="chatml-tools")


# --- make_plan: constraints ---------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_make_plan_forced_tool_choice_is_a_structural_tag_with_the_parameters(hermes: ChatFeatures,
                                                                               choice: Any) -> None:
    plan = plan_of(hermes, TOOL_CHAT | {"tool_choice": choice})
    spec = plan.structured
    assert spec is not None and spec.structural_tag is not None
    others = (spec.json, spec.json_object, spec.regex, spec.choice, spec.grammar)
    assert others == (None, False, None, None, None)
    tag = json.loads(spec.structural_tag)
    assert tag["type"] == "structural_tag"
    schemas = list(_values(tag, "json_schema"))
    assert WEATHER["function"]["parameters"] in schemas  # tool_strict_level "parameter"
    names = ["get_weather", "add"] if choice == "required" else ["get_weather"]  # named: that tool only
    begins = {b for b in _values(tag, "begin") if "name" in b}
    assert begins == {f'<tool_call>{nl}{{"name": "{n}", "arguments": ' for n in names for nl in ("\n", "")}
    assert plan.tools == TOOLS and not plan.skip_special_tokens  # hermes reads its tags from the text


def test_make_plan_function_strict_level_constrains_only_the_envelope(smol: RouterTokenizer) -> None:
    features = loaded(smol.hf, "hermes", tool_strict_level="function")
    tag = plan_of(features, TOOL_CHAT | {"tool_choice": "required"}).structured.structural_tag
    assert "get_weather" in tag and "CITY_PARAM" not in tag


@pytest.mark.parametrize("fmt, field, value", [
    ({"type": "json_object"}, "json_object", True),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": ADD_PARAMS}}, "json",
     json.dumps(ADD_PARAMS)),
])
def test_make_plan_response_format_is_a_json_constraint(hermes: ChatFeatures, fmt: dict, field: str,
                                                        value: Any) -> None:
    plan = plan_of(hermes, CHAT | {"response_format": fmt})
    assert plan.structured is not None and getattr(plan.structured, field) == value
    assert plan.structured.structural_tag is None and plan.tools is None


def test_make_plan_response_format_text_is_no_constraint(hermes: ChatFeatures) -> None:
    assert not hermes.wanted(CHAT | {"response_format": {"type": "text"}})
    assert plan_of(hermes, CHAT | {"response_format": {"type": "text"}}).structured is None


async def test_chat_features_compact_json_disables_free_whitespace(smol: RouterTokenizer) -> None:
    features = loaded(smol.hf, "hermes", compact_json=True)
    plan = await features.plan(CHAT | {"response_format": {"type": "json_object"}})
    assert plan.structured.json_object and plan.structured.disable_any_whitespace
    forced = await features.plan(TOOL_CHAT | {"tool_choice": "required"})
    assert forced.structured.disable_any_whitespace is False  # the tools' tag is left as vLLM made it


def test_make_plan_tool_choice_none_shows_the_tools_but_parses_no_call(hermes: ChatFeatures) -> None:
    plan = plan_of(hermes, TOOL_CHAT | {"tool_choice": "none"})
    assert plan.tools is not None and plan.structured is None  # as vLLM: the prompt keeps its prefix
    message, reason = plan.full("Let me check." + CALL_W, [], "stop")
    assert "tool_calls" not in message and reason == "stop"


def test_make_plan_auto_lists_the_tools_and_allows_text(hermes: ChatFeatures) -> None:
    plan = plan_of(hermes, TOOL_CHAT)
    assert plan.tools == TOOLS and plan.auto_tools and plan.request.tool_choice == "auto"
    assert "triggered_tags" in plan.structured.structural_tag  # calls constrained once begun, text free


# --- make_plan: bad requests --------------------------------------------------------------------------
@pytest.mark.parametrize("extra, param, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "does not match any of the specified `tools`"),
    ({"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "Invalid value for `tool_choice`"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}, "response_format",
     "json_schema needs a 'schema'"),
    ({"tools": TOOLS, "response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
     "response_format", "json_schema needs a 'schema'"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "'json_schema' field must be provided"),
    ({"response_format": {"type": "xml"}}, "response_format", "'json_object' or 'json_schema'"),
    ({"tools": [{"type": "function"}]}, "tools", "'tools.0.function': Field required"),
], ids=["named-unknown", "required-no-tools", "choice-unknown", "schema-missing", "schema-missing-with-tools",
        "json_schema-missing", "format-unknown", "tool-no-function"])
def test_make_plan_bad_input_is_a_400_naming_it(hermes: ChatFeatures, extra: dict, param: str,
                                                words: str) -> None:
    with pytest.raises(BadRequest) as err:
        plan_of(hermes, CHAT | extra)
    assert (err.value.status, err.value.param) == (400, param)
    assert words in err.value.message


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": TOOLS}, "tool_choice", 'tool_choice "auto" needs a tool parser'),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", 'tool_choice "auto" needs a tool parser'),
    ({"tools": TOOLS, "tool_choice": "required"}, "tools", "tools need a tool parser"),
])
async def test_make_plan_tools_without_a_tool_parser_are_a_400(smol: RouterTokenizer, extra: dict, param: str,
                                                               words: str) -> None:
    features = loaded(smol.hf, "", "", chat_template="")
    with pytest.raises(BadRequest) as err:
        await features.plan(CHAT | extra)
    assert (err.value.status, err.value.param) == (400, param) and words in err.value.message
    plan = await features.plan(CHAT | {"tools": TOOLS, "tool_choice": "none"})  # nothing to parse: fine
    assert plan.parser is None
    assert plan.full("hi", [], "stop") == ({"role": "assistant", "content": "hi"}, "stop")
    assert (await features.plan(CHAT | {"response_format": {"type": "json_object"}})).structured.json_object


# --- the constraint across the wire; the NATS body --------------------------------------------------
@pytest.mark.parametrize("extra", [
    {"tools": TOOLS, "tool_choice": "required"}, {"tools": TOOLS, "tool_choice": NAMED}, {"tools": TOOLS},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": ADD_PARAMS}}},
], ids=["required", "named", "auto", "json_object", "json_schema"])
def test_make_plan_constraint_reaches_the_worker_as_vllm_made_it(hermes: ChatFeatures, extra: dict) -> None:
    from kvrelay.schemas import SamplingSpec, pack, unpack
    from kvrelay.schemas.messages import PrefillTask
    from kvrelay.workers.vllm_engine.runtime import structured_outputs

    plan = plan_of(hermes, CHAT | extra)
    task = PrefillTask(request_id="r", tenant="t", prompt_token_ids=[1], stream_subject="a.b", deadline_ms=1,
                       sampling=SamplingSpec(structured=plan.structured))
    received = unpack(pack(task), PrefillTask).sampling.structured
    assert structured_outputs(received) == plan.request.extract_structured_outputs()


def test_make_plan_takes_the_nats_chat_body(hermes: ChatFeatures) -> None:
    from kvrelay.router.intake import chat_body
    from kvrelay.schemas.messages import (
        ChatMessage,
        ClientRequest,
        FunctionCall,
        FunctionSpec,
        ToolCall,
        ToolSpec,
    )

    req = ClientRequest(
        request_id="r", stream_subject="s.r", tool_choice=NAMED, parallel_tool_calls=False,
        tools=[ToolSpec(function=FunctionSpec(name="get_weather", parameters=WEATHER_PARAMS))],
        messages=[ChatMessage(role="user", content="Weather?"),
                  ChatMessage(role="assistant", content=None, tool_calls=[
                      ToolCall(id="c1", function=FunctionCall(name="get_weather", arguments=W_ARGS))]),
                  ChatMessage(role="tool", content="sunny", tool_call_id="c1")])
    plan = plan_of(hermes, chat_body(req))
    assert plan.named == "get_weather" and plan.structured.structural_tag is not None
    assert [t["function"]["name"] for t in plan.tools] == ["get_weather"]


# --- gpt-oss -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tool, reasoning, harmony", [
    ("openai", "openai_gptoss", True), ("openai", "", True), ("", "openai_gptoss", True),
    ("hermes", "", False), ("llama3_json", "deepseek_r1", False), ("", "", False)])
def test_chat_features_gpt_oss_parsers_mean_harmony(tool: str, reasoning: str, harmony: bool) -> None:
    features = ChatFeatures(ChatConfig(tool_call_parser=tool, reasoning_parser=reasoning), tokenizer=None)
    assert features.harmony is harmony


@pytest.mark.parametrize("extra, begin", [
    ({"tools": TOOLS, "tool_choice": "required"}, "<|channel|>commentary to=functions.get_weather"),
    ({"response_format": {"type": "json_object"}}, "<|channel|>final"),
], ids=["required", "json_object"])
def test_make_plan_gpt_oss_constraints_are_harmony_structural_tags(smol: RouterTokenizer, extra: dict,
                                                                   begin: str) -> None:
    """With gpt-oss's parsers the plan's parser is vLLM's HarmonyParser (the stub parsers alone raise
    NotImplementedError on every output), and every constraint lets the analysis channel come first."""
    features = loaded(smol.hf, "openai", "openai_gptoss")
    plan = plan_of(features, CHAT | extra)
    assert type(plan.parser).__name__ == "HarmonyParser"
    tag = json.loads(plan.structured.structural_tag)
    begins = list(_values(tag, "begin"))
    assert "<|channel|>analysis<|message|>" in begins
    assert any(b.startswith(begin) for b in begins)


async def test_chat_features_can_exclude_tools_when_tool_choice_is_none(smol: RouterTokenizer) -> None:
    features = loaded(smol.hf, "hermes", exclude_tools_when_tool_choice_none=True)
    assert (await features.plan(TOOL_CHAT | {"tool_choice": "none"})).tools is None
    assert (await features.plan(TOOL_CHAT | {"tool_choice": "auto"})).tools is not None
