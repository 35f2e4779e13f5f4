"""`kvrelay up` end to end on the real SmolLM2-135M-Instruct: coherent answers, and greedy output equal
token for token to one plain vLLM instance of the same model."""

from __future__ import annotations

import json

import httpx
import pytest

from kvrelay.models import resolve


pytestmark = pytest.mark.e2e


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm2_deployment(tmp_path_factory, start_deployment):
    ports = {"prefill": _free_port(), "decode": _free_port()}
    dep = start_deployment(tmp_path_factory.mktemp("run"), "smollm2",
                ["--set", "engine.dtype=\"float32\"", "--set", "engine.max_model_len=2048",
                 "--set", "router.chat.compact_json=true",
                 "--set", f"prefill.metrics_port={ports['prefill']}", "--set", f"decode.metrics_port={ports['decode']}"])
    dep.metrics = {k: f"http://127.0.0.1:{p}/metrics" for k, p in ports.items()}
    yield dep
    assert dep.stop() == 0, "".join(dep.output[-40:])


def test_up_smollm2_answers_through_the_openai_client(smollm2_deployment) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{smollm2_deployment.url}/v1", api_key="unused", timeout=300)
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content


def test_up_smollm2_greedy_output_equals_plain_vllm(smollm2_deployment, plain_vllm) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve("smollm2")))
    questions = ["Explain in two sentences why the sky is blue.",
                 "Write a haiku about the sea. " + "It should be calm and quiet. " * 12]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True) for q in questions]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    got = []
    for ids in prompts:
        r = httpx.post(f"{smollm2_deployment.url}/v1/completions", timeout=300,
                       json={"model": "SmolLM2-135M-Instruct", "prompt": ids, "max_tokens": 32, "temperature": 0})
        assert r.status_code == 200, r.text
        got.append(r.json()["choices"][0]["text"])
    want = [o["text"] for o in plain_vllm("smollm2", "float32", prompts, 32)]
    assert got == want


# --- tools, reasoning-free structured outputs, the NATS intake (issue: agents) -------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
MODEL = "SmolLM2-135M-Instruct"


def _streamed_call(client, **kw) -> tuple[list[dict], str | None]:
    """Tool calls assembled from a stream's deltas the way OpenAI's docs show, and the finish reason."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for tc in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or tc.id
            if tc.function is not None:
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_up_smollm2_runs_a_tool_loop_through_the_openai_client(smollm2_deployment, stream) -> None:
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=f"{smollm2_deployment.url}/v1", api_key="unused", timeout=300)
    messages = [{"role": "user", "content": "What will the weather be in Rome for the next 3 days?"}]
    kw = dict(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=160,
              temperature=1.0)
    if stream:
        calls, finish = _streamed_call(client, **kw)
    else:
        reply = client.chat.completions.create(**kw)
        finish = reply.choices[0].finish_reason
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in reply.choices[0].message.tool_calls or []]
    assert finish == "tool_calls" and len(calls) >= 1
    call = calls[0]
    assert call["id"] and call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call["id"], "type": "function",
                      "function": {"name": call["name"], "arguments": call["arguments"]}}]},
                 {"role": "tool", "tool_call_id": call["id"], "content": '{"forecast": "sunny, 24 C"}'}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=48, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert not final.choices[0].message.tool_calls and final.choices[0].message.content.strip()


def test_up_smollm2_named_tool_choice_finishes_with_stop(smollm2_deployment) -> None:
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=f"{smollm2_deployment.url}/v1", api_key="unused", timeout=300)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo, please."}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=64, temperature=1.0)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "stop" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


SCHEMAS = [
    {"type": "object", "additionalProperties": False, "required": ["answer"],
     "properties": {"answer": {"type": "boolean"}}},
    {"type": "object", "additionalProperties": False, "required": ["n", "unit"],
     "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                    "unit": {"type": "string", "enum": ["km", "mi"]}}},
    {"type": "object", "additionalProperties": False, "required": ["tags"],
     "properties": {"tags": {"type": "array", "maxItems": 3,
                             "items": {"type": "string", "enum": ["red", "green", "blue"]}}}},
    {"type": "object", "additionalProperties": False, "required": ["city", "temp"],
     "properties": {"city": {"type": "string", "maxLength": 12},
                    "temp": {"type": "integer", "minimum": -60, "maximum": 60}}},  # bounded: no endless digits
    {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "integer", "minimum": -5, "maximum": 5}},
    {"type": "object", "additionalProperties": False, "required": ["ok", "why"],
     "properties": {"ok": {"type": "boolean"}, "why": {"type": "string", "enum": ["yes", "no", "maybe"]}}},
]


def _structured(url: str, schema: dict, session: str = "") -> dict:
    body = {"model": MODEL, "max_tokens": 96, "temperature": 1.0,
            "messages": [{"role": "user", "content": "Answer in JSON about the weather in Paris today."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    if session:
        body["session_id"] = session
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_up_smollm2_structured_outputs_hold_across_the_handover(smollm2_deployment, metric) -> None:
    """The prefill worker samples the first token and a decode worker the rest (its grammar advanced
    over the first token), or a decode worker all of them (local prefill, a session's next step):
    at temperature 1 every output parses and validates, for every schema."""
    import jsonschema

    url = smollm2_deployment.url
    locals_before = metric(httpx.get(smollm2_deployment.metrics["decode"]).text,
                           "kvrelay_decode_local_prefill_total", outcome="accepted")
    for i, schema in enumerate(SCHEMAS):
        for session in ("", f"schema-{i}", f"schema-{i}"):  # transfer; then a session's two steps
            choice = _structured(url, schema, session)
            assert choice["finish_reason"] == "stop", choice
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    locals_after = metric(httpx.get(smollm2_deployment.metrics["decode"]).text,
                          "kvrelay_decode_local_prefill_total", outcome="accepted")
    assert locals_after - locals_before >= len(SCHEMAS)  # each session's second step ran locally


def test_up_smollm2_rejects_bad_tool_requests_with_400(smollm2_deployment) -> None:
    url = smollm2_deployment.url
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad = [dict(base, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
           dict(base, tool_choice="required"),
           dict(base, response_format={"type": "json_schema"}),
           dict(base, tools=[{"type": "function"}])]
    for body in bad:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/chat/completions", json=base, timeout=120).status_code == 200


async def test_up_smollm2_nats_intake_carries_tools_and_parsed_calls(smollm2_deployment) -> None:
    import jsonschema
    import nats

    from kvrelay.schemas import ClientRequest, SamplingSpec, TokenChunk, pack, unpack
    from kvrelay.schemas.messages import ChatMessage, ToolSpec

    nc = await nats.connect(smollm2_deployment.nats_url)
    try:
        inbox = "client.e2e.tools1"
        sub = await nc.subscribe(inbox)
        req = ClientRequest(request_id="nats-tools-1", stream_subject=inbox, model=MODEL,
                            messages=[ChatMessage(role="user", content="Weather in Paris for 2 days?")],
                            tools=[msgspec_convert(WEATHER, ToolSpec)], tool_choice="required",
                            sampling=SamplingSpec(max_tokens=64, temperature=1.0))
        await nc.jetstream().publish("kvrelay.default.req.default", pack(req), timeout=10)
        chunks: list[TokenChunk] = []
        while not chunks or chunks[-1].finish_reason is None:
            chunks.append(unpack((await sub.next_msg(timeout=120)).data, TokenChunk))
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert chunks[-1].finish_reason == "tool_calls"
        pieces = [tc for c in chunks for tc in c.tool_calls]
        assert pieces and pieces[0].name == "get_weather" and pieces[0].id
        arguments = "".join(tc.arguments for tc in pieces if tc.index == 0)
        jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
        assert not "".join(c.text for c in chunks).strip()  # the call is not also sent as content
    finally:
        await nc.close()


def msgspec_convert(value: dict, cls: type):
    import msgspec

    return msgspec.convert(value, cls)
