"""Tools, structured outputs and parsed chunks on the wire: validated on receipt, round-tripping."""

from __future__ import annotations

import msgpack
import pytest

from kvrelay.schemas import (
    ClientRequest,
    SamplingSpec,
    SchemaError,
    TokenChunk,
    ValidationError,
    pack,
    unpack,
)
from kvrelay.schemas.messages import (
    ChatMessage,
    FunctionCall,
    FunctionSpec,
    PrefillTask,
    StructuredSpec,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = ToolSpec(function=FunctionSpec(name="get_weather", description="The weather", parameters=PARAMS,
                                         strict=True))
HISTORY = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="Weather in Paris?"),
    ChatMessage(role="assistant", content=None, tool_calls=[
        ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))]),
    ChatMessage(role="tool", content="sunny", tool_call_id="call_1", name="get_weather"),
]


def _wire(type_: str, body: dict) -> bytes:
    return msgpack.packb({"t": type_, "v": 1, "b": body}, use_bin_type=True)


@pytest.mark.parametrize("fields", [
    {"json": '{"type": "object"}'}, {"json_object": True}, {"regex": "[a-z]+"}, {"choice": ["yes", "no"]},
    {"grammar": 'root ::= "a"'}, {"structural_tag": '{"type": "structural_tag"}'},
    {"json_object": True, "disable_any_whitespace": True, "disable_additional_properties": True},
])
def test_structured_spec_with_one_constraint_round_trips_in_a_task(fields: dict) -> None:
    spec = StructuredSpec(**fields)
    task = PrefillTask(request_id="r", tenant="t", prompt_token_ids=[1], stream_subject="a.b", deadline_ms=1,
                       sampling=SamplingSpec(structured=spec))
    assert unpack(pack(task), PrefillTask).sampling.structured == spec


@pytest.mark.parametrize("fields", [
    {}, {"disable_any_whitespace": True}, {"json": "{}", "regex": "a"},
    {"json_object": True, "choice": ["a"]}, {"grammar": "g", "structural_tag": "{}"},
])
def test_structured_spec_rejects_zero_or_two_constraints(fields: dict) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        StructuredSpec(**fields)
    body = {"request_id": "r", "tenant": "t", "prompt_token_ids": [1], "sampling": {"structured": fields},
            "stream_subject": "a.b", "deadline_ms": 1}
    with pytest.raises(SchemaError, match="exactly one"):
        unpack(_wire("PrefillTask", body), PrefillTask)  # and on receipt


def test_client_request_with_tools_round_trips() -> None:
    req = ClientRequest(request_id="r", stream_subject="client.r", messages=HISTORY, tools=[WEATHER],
                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                        parallel_tool_calls=False, include_reasoning=False,
                        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {}}})
    back = unpack(pack(req), ClientRequest)
    assert back == req
    assert back.messages[2].tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert back.messages[3].tool_call_id == "call_1"
    for choice in ("auto", "required", "none"):
        assert unpack(pack(req.replace(tool_choice=choice)), ClientRequest).tool_choice == choice


def test_client_request_defaults_keep_older_clients_valid() -> None:
    req = unpack(_wire("ClientRequest", {"request_id": "r", "stream_subject": "s.r",
                                         "messages": [{"role": "user", "content": "hi"}]}), ClientRequest)
    unset = (req.tools, req.tool_choice, req.parallel_tool_calls, req.response_format)
    assert unset == (None, None, None, None)
    assert req.include_reasoning and req.messages[0].tool_calls is None and req.messages[0].tool_call_id == ""


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"tool_choice": "auto"},
    {"response_format": {"type": "json_object"}},
])
def test_client_request_tools_or_format_without_messages_is_rejected(extra: dict) -> None:
    body = {"request_id": "r", "stream_subject": "s.r", "prompt": "hi", **extra}
    with pytest.raises(SchemaError, match="need messages"):
        unpack(_wire("ClientRequest", body), ClientRequest)


@pytest.mark.parametrize("body", [
    {"tools": [{"type": "function"}]},  # no function
    {"tools": [{"type": "retrieval", "function": {"name": "f"}}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}]},
    {"messages": [{"role": "robot", "content": "x"}]},
])
def test_client_request_malformed_tools_are_schema_errors(body: dict) -> None:
    base = {"request_id": "r", "stream_subject": "s.r", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(SchemaError):
        unpack(_wire("ClientRequest", base | body), ClientRequest)


def test_token_chunk_with_parsed_fields_round_trips() -> None:
    chunk = TokenChunk(request_id="r", seq=4, token_ids=[5, 6], text="Sure.", reasoning="think",
                       tool_calls=[ToolCallDelta(index=0, id="call_1", name="get_weather", arguments='{"ci'),
                                   ToolCallDelta(index=1, arguments="ty")],
                       finish_reason="tool_calls", usage=Usage(prompt_tokens=3, completion_tokens=2))
    assert unpack(pack(chunk), TokenChunk) == chunk
    plain = unpack(_wire("TokenChunk", {"request_id": "r", "seq": 0}), TokenChunk)
    assert (plain.reasoning, plain.tool_calls) == ("", [])
