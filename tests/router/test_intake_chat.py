"""The NATS intake's chat pieces without a bus: the OpenAI body a ClientRequest becomes, and a worker's
chunk relayed with its text parsed."""

from __future__ import annotations

from kvrelay.router.intake import chat_body, relayed
from kvrelay.schemas.messages import (
    ChatMessage,
    ClientRequest,
    FunctionCall,
    FunctionSpec,
    TokenChunk,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}}
HISTORY = [
    ChatMessage(role="user", content="Weather in Paris?"),
    ChatMessage(role="assistant", content=None, tool_calls=[
        ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))]),
    ChatMessage(role="tool", content="sunny", tool_call_id="call_1", name="get_weather"),
]


def test_intake_chat_body_is_the_openai_body() -> None:
    req = ClientRequest(request_id="r", stream_subject="s.r", model="smollm2", messages=HISTORY,
                        tools=[ToolSpec(function=FunctionSpec(name="get_weather", parameters=PARAMS))],
                        tool_choice="required", parallel_tool_calls=False, include_reasoning=False,
                        response_format={"type": "json_object"})
    assert chat_body(req) == {
        "model": "smollm2", "include_reasoning": False,
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "get_weather"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "",
                                                    "parameters": PARAMS, "strict": None}}],
        "tool_choice": "required", "parallel_tool_calls": False, "response_format": {"type": "json_object"}}


def test_intake_chat_body_leaves_unset_fields_out() -> None:
    req = ClientRequest(request_id="r", stream_subject="s.r",
                        messages=[ChatMessage(role="user", content="hi")])
    assert chat_body(req) == {"model": "kvrelay", "include_reasoning": True,
                              "messages": [{"role": "user", "content": "hi"}]}


def test_intake_relayed_maps_parsed_fields_onto_the_chunk() -> None:
    chunk = TokenChunk(request_id="r", seq=7, token_ids=[11, 12, 13], text="<tool_call>{...", worker="d1",
                       usage=Usage(prompt_tokens=5, completion_tokens=8), finish_reason="stop")
    fields = {"content": "Sure.", "reasoning_content": "think", "reasoning": "think", "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather"}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 1, "function": {"arguments": None}}]}
    out = relayed(chunk, fields, "tool_calls")
    kept = (out.request_id, out.seq, out.token_ids, out.worker, out.usage)
    assert kept == ("r", 7, [11, 12, 13], "d1", chunk.usage)
    assert (out.text, out.reasoning, out.finish_reason) == ("Sure.", "think", "tool_calls")
    assert out.tool_calls == [ToolCallDelta(index=0, id="call_1", name="get_weather"),
                              ToolCallDelta(index=0, arguments='{"city": '), ToolCallDelta(index=1)]
    assert out.sent_ms > 0


def test_intake_relayed_chunk_with_nothing_parsed_yet_keeps_its_tokens() -> None:
    chunk = TokenChunk(request_id="r", seq=2, token_ids=[9], text="<tool_")
    out = relayed(chunk, {}, None)
    assert (out.seq, out.token_ids, out.text, out.reasoning, out.tool_calls, out.finish_reason) == (
        2, [9], "", "", [], None)
