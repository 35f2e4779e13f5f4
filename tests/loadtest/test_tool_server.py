"""``loadtest/tool_server.py``: the tools ``kvrelay bench agent``'s agents call (schemas, results, the
subset checker against ``jsonschema``) and their loopback HTTP server."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from kvrelay.loadtest import tool_server as T


# --- tool server --------------------------------------------------------------------------------------------
@pytest.fixture
async def tools() -> AsyncIterator[tuple[T.ToolServer, str]]:
    server = T.ToolServer(latency_ms=0)
    url = await server.start()
    try:
        yield server, url
    finally:
        await server.stop()


async def _post(url: str, body: Any) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(url + "/call", json=body) as r:
        return r.status, await r.json()


async def test_tool_server_answers_a_valid_call_with_its_result_and_the_asked_filler(tools) -> None:
    server, url = tools
    status, body = await _post(url, {"name": "calculator", "arguments": {"op": "mul", "a": 6, "b": 7},
                                     "pad_words": 25, "salt": "x"})
    assert status == 200 and body["result"] == 42 and len(body["details"].split()) == 25
    _, answer = await _post(url, {"name": "lookup", "arguments": {"key": "peru"}})
    assert answer == {"result": "Lima", "details": ""}
    assert server.calls == 2


@pytest.mark.parametrize("body", [{"name": "calculator", "arguments": {"op": "div", "a": 1, "b": 2}},
                                  {"name": "calculator", "arguments": {"op": "add", "a": 1}},
                                  {"name": "lookup", "arguments": {"key": "mars"}},
                                  {"name": "shell", "arguments": {}},
                                  {"name": "lookup", "arguments": {"key": "peru"}, "pad_words": -1},
                                  ["not", "an", "object"]])
async def test_tool_server_rejects_calls_that_break_the_schema_with_400_and_a_reason(tools, body) -> None:
    status, answer = await _post(tools[1], body)
    assert status == 400 and answer["error"]


async def test_tool_server_start_is_idempotent_and_stop_closes_the_port() -> None:
    server = T.ToolServer(latency_ms=0)
    async with server as url:
        assert await server.start() == url and url.startswith("http://127.0.0.1:")
    with pytest.raises(aiohttp.ClientConnectionError):
        await _post(url, {"name": "lookup", "arguments": {"key": "peru"}})


def test_call_tool_computes_from_a_table_of_operations() -> None:
    assert T.call_tool("calculator", {"op": "add", "a": -3, "b": 1000}) == 997
    assert T.call_tool("calculator", {"op": "mul", "a": -3, "b": 4}) == -12
    assert T.call_tool("lookup", {"key": "norway"}) == "Oslo"


CASES = [({"op": "add", "a": 1, "b": 2}, True), ({"op": "add", "a": 1, "b": 2, "c": 3}, False),
         ({"op": "add", "a": 1.5, "b": 2}, False), ({"op": "add", "a": True, "b": 2}, False),
         ({"op": "pow", "a": 1, "b": 2}, False), ({"op": "mul", "a": 1001, "b": 2}, False),
         ({"op": "mul", "a": -1000, "b": 1000}, True), ({"a": 1, "b": 2}, False), ([1, 2], False),
         ("x", False)]


@pytest.mark.parametrize(("args", "ok"), CASES)
def test_check_schema_agrees_with_jsonschema_on_the_tools_subset(args: Any, ok: bool) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = T.PARAMETERS["calculator"]
    assert (T.check_schema(args, schema) == []) is ok
    assert jsonschema.Draft202012Validator(schema).is_valid(args) is ok


def test_validate_arguments_falls_back_to_check_schema_without_jsonschema(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import fails
    assert T.validate_arguments("calculator", {"op": "add", "a": 1, "b": 2}) == []
    assert T.validate_arguments("calculator", {"op": "add", "a": 1}) == ["$: 'b' is required"]
    assert T.validate_arguments("nope", {}) == ["unknown tool 'nope'"]


def test_openai_tools_are_function_tools_with_closed_bounded_schemas() -> None:
    tools = T.openai_tools()
    assert [t["function"]["name"] for t in tools] == ["calculator", "lookup"]
    for t in tools:
        params = t["type"] == "function" and t["function"]["parameters"]
        assert params["additionalProperties"] is False and params["required"] == list(params["properties"])
    calc = tools[0]["function"]["parameters"]["properties"]
    assert calc["op"]["enum"] == ["add", "mul"] and calc["a"]["maximum"] == T.BOUND


def test_filler_is_the_same_text_for_the_same_salt() -> None:
    assert T.filler(40, "a") == T.filler(40, "a") != T.filler(40, "b")
    assert len(T.filler(40, "a").split()) == 40 and T.filler(0, "a") == ""
