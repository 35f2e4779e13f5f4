"""`kvrelay up` end to end on the tiny model: real nats-server, router, prefill and decode processes, vLLM.

One deployment serves the whole module (starting vLLM twice costs ~40 s on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from kvrelay.schemas import ClientRequest, SamplingSpec, TokenChunk, unpack, pack

pytestmark = pytest.mark.e2e

CHAT = {"role": "user", "content": "Name three rivers in Europe and say one thing about each."}


def _chat(dep, **kw) -> dict:
    body = {"model": "kvrelay-tiny", "messages": [CHAT], "max_tokens": 16, "temperature": 0}
    body.update(kw)
    return body


async def _wait_for(cond, timeout: float = 30.0, every: float = 0.2):
    """Poll an observable condition until it holds (a deadline, not a sleep used as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


def test_up_chat_completion_returns_text_and_usage(tiny_deployment) -> None:
    r = httpx.post(f"{tiny_deployment.url}/v1/chat/completions", json=_chat(tiny_deployment), timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 16
    assert body["usage"]["prompt_tokens"] > 10
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 16


def test_up_streams_sse_in_order_with_usage(tiny_deployment) -> None:
    body = _chat(tiny_deployment, stream=True, stream_options={"include_usage": True}, max_tokens=12)
    events = []
    with httpx.stream("POST", f"{tiny_deployment.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert text and finish == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    # the same request without streaming gives the same greedy text
    plain = httpx.post(f"{tiny_deployment.url}/v1/chat/completions", json=_chat(tiny_deployment, max_tokens=12),
                       timeout=120).json()
    assert plain["choices"][0]["message"]["content"] == text


def test_up_openai_client_streams_a_chat_completion(tiny_deployment) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{tiny_deployment.url}/v1", api_key="unused", timeout=120)
    assert [m.id for m in client.models.list().data] == ["kvrelay-tiny"]
    stream = client.chat.completions.create(model="kvrelay-tiny", messages=[CHAT], max_tokens=10, stream=True,
                                            temperature=0, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts)
    assert usage is not None and usage.completion_tokens == 10


def test_up_greedy_output_equals_plain_vllm_and_kv_is_transferred(tiny_deployment, plain_vllm, metric) -> None:
    """Token for token equal to one plain vLLM instance; the decode side loaded the KV, recomputed nothing."""
    before = httpx.get(tiny_deployment.metrics["decode"], timeout=10).text
    prompts = [[(i * 37 + 11 * n) % 49000 + 100 for i in range(n)] for n in (45, 301, 640)]
    got = []
    for ids in prompts:
        r = httpx.post(f"{tiny_deployment.url}/v1/completions", timeout=180,
                       json={"model": "kvrelay-tiny", "prompt": ids, "max_tokens": 40, "temperature": 0})
        assert r.status_code == 200, r.text
        got.append(r.json()["choices"][0]["text"])
    want = [o["text"] for o in plain_vllm("tiny", "float32", prompts, 40)]
    assert got == want
    after = httpx.get(tiny_deployment.metrics["decode"], timeout=10).text
    moved = metric(after, "kvrelay_kv_bytes_moved_total") - metric(before, "kvrelay_kv_bytes_moved_total")
    # every prompt's KV came over: tiny is 2 layers x 2 KV heads x 64 x 2 (K,V) x 4 bytes per token
    assert moved >= sum(len(p) // 32 * 32 for p in prompts) * 2 * 2 * 64 * 2 * 4
    recomputed = (metric(after, "kvrelay_decode_kv_recomputed_total")
                  - metric(before, "kvrelay_decode_kv_recomputed_total"))
    assert recomputed == 0


async def test_up_eight_concurrent_requests_complete(tiny_deployment) -> None:
    async with httpx.AsyncClient(base_url=tiny_deployment.url, timeout=180) as client:
        async def one(i: int) -> dict:
            r = await client.post("/v1/completions", json={"model": "kvrelay-tiny", "prompt": f"Story number {i}:",
                                                           "max_tokens": 20, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()

        results = await asyncio.gather(*(one(i) for i in range(8)))
    assert all(r["usage"]["completion_tokens"] == 20 for r in results)
    assert len({r["choices"][0]["text"] for r in results}) > 1


async def test_up_client_disconnect_cancels_work_on_the_workers(tiny_deployment, metric) -> None:
    async def aborted() -> float:
        async with httpx.AsyncClient(timeout=10) as c:
            text = (await c.get(tiny_deployment.metrics["decode"])).text
        return metric(text, "kvrelay_decode_requests_total", outcome="abort")

    start = await aborted()
    body = _chat(tiny_deployment, max_tokens=1500, stream=True, ignore_eos=True)
    async with httpx.AsyncClient(base_url=tiny_deployment.url, timeout=120) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream
    await _wait_for(lambda: _gt(aborted, start))


async def _gt(fn, value: float) -> bool:
    return (await fn()) > value


async def test_up_overload_gets_429_with_a_message_and_others_complete(tiny_deployment) -> None:
    """A burst beyond the router's bound (router.max_inflight=10, waiting included) gets 429s; the
    admitted requests all complete: busy workers make them wait in the admission queue, not fail."""
    async with httpx.AsyncClient(base_url=tiny_deployment.url, timeout=180) as client:
        async def one(i: int) -> httpx.Response:
            return await client.post("/v1/completions", json={"model": "kvrelay-tiny", "prompt": f"Count {i}",
                                                              "max_tokens": 60, "temperature": 0})

        responses = await asyncio.gather(*(one(i) for i in range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 10
    rejected = next(r for r in responses if r.status_code == 429)
    assert "requests in flight" in rejected.json()["error"]["message"]
    assert "retry-after" in {k.lower() for k in rejected.headers}


@pytest.mark.parametrize(
    "payload, status",
    [
        pytest.param(b"{not json", 400, id="invalid_json"),
        pytest.param({"model": "kvrelay-tiny"}, 400, id="no_messages"),
        pytest.param({"model": "kvrelay-tiny", "messages": [CHAT], "max_tokens": -1}, 400, id="negative_max_tokens"),
        pytest.param({"model": "kvrelay-tiny", "messages": [CHAT], "temperature": "hot"}, 400, id="wrong_type"),
        pytest.param({"model": "kvrelay-tiny", "messages": [CHAT], "n": 2}, 400, id="n_above_one"),
        pytest.param({"model": "no-such-model", "messages": [CHAT]}, 404, id="unknown_model"),
        pytest.param({"model": "kvrelay-tiny", "messages": [{"role": "user", "content": "word " * 5000}]}, 400,
                     id="prompt_over_context"),
        pytest.param({"model": "kvrelay-tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, id="bad_role"),
    ],
)
async def test_up_bad_input_gets_4xx_while_a_good_request_completes(tiny_deployment, payload, status):
    async with httpx.AsyncClient(base_url=tiny_deployment.url, timeout=180) as client:
        good = asyncio.create_task(client.post("/v1/chat/completions", json=_chat(tiny_deployment, max_tokens=24)))
        kw = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, bytes) \
            else {"json": payload}
        bad = await client.post("/v1/chat/completions", **kw)
        assert bad.status_code == status, bad.text
        assert bad.json()["error"]["message"]
        ok = await good
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 24


async def test_up_nats_intake_streams_tokens_to_the_client_subject(tiny_deployment) -> None:
    import nats

    nc = await nats.connect(tiny_deployment.nats_url)
    try:
        inbox = "client.e2e.stream1"
        sub = await nc.subscribe(inbox, max_msgs=0)
        req = ClientRequest(request_id="nats-e2e-1", stream_subject=inbox, model="kvrelay-tiny",
                            prompt="Once upon a time", sampling=SamplingSpec(max_tokens=8, temperature=0.0))
        js = nc.jetstream()
        await js.publish("kvrelay.default.req.default", pack(req), timeout=10)
        chunks: list[TokenChunk] = []
        while not chunks or chunks[-1].finish_reason is None:
            msg = await sub.next_msg(timeout=120)
            chunks.append(unpack(msg.data, TokenChunk))
        chunks.sort(key=lambda c: c.seq)
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        assert sum(len(c.token_ids) for c in chunks) == 8
    finally:
        await nc.close()


async def test_up_nats_intake_invalid_request_gets_an_error_chunk(tiny_deployment) -> None:
    import msgpack
    import nats

    nc = await nats.connect(tiny_deployment.nats_url)
    try:
        inbox = "client.e2e.bad1"
        sub = await nc.subscribe(inbox)
        bad = msgpack.packb({"t": "ClientRequest", "v": 1, "b": {"request_id": "bad-1", "stream_subject": inbox,
                                                                  "prompt": "x", "messages": []}})
        await nc.jetstream().publish("kvrelay.default.req.default", bad, timeout=10)
        chunk = unpack((await sub.next_msg(timeout=60)).data, TokenChunk)
        assert chunk.finish_reason == "error" and chunk.error is not None and chunk.error.status == 400
        # and the deployment keeps serving
        r = httpx.post(f"{tiny_deployment.url}/v1/chat/completions", json=_chat(tiny_deployment, max_tokens=4),
                       timeout=120)
        assert r.status_code == 200
    finally:
        await nc.close()


@pytest.mark.parametrize("backend,endpoint", [("openai-chat", "/v1/chat/completions"),
                                              ("openai", "/v1/completions")])
def test_up_serves_vllm_benchmark_client(tiny_deployment, tmp_path, backend, endpoint) -> None:
    """vLLM's own serving benchmark (a standard OpenAI-compatible client) runs clean against kvrelay."""
    import os
    import subprocess
    import sys

    from kvrelay import models

    out = tmp_path / "result.json"
    argv = [sys.executable, "-m", "kvrelay.loadtest.vllm_bench", "--backend", backend,
            "--base-url", tiny_deployment.url, "--endpoint", endpoint, "--model", "kvrelay-tiny",
            "--tokenizer", str(models.model_dir("tiny")), "--dataset-name", "random",
            "--random-input-len", "96", "--random-output-len", "8", "--num-prompts", "4",
            "--max-concurrency", "2", "--ignore-eos", "--save-result", "--result-dir", str(tmp_path),
            "--result-filename", out.name]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (4, 0), result.get("errors")
    assert result["total_output_tokens"] == 4 * 8
    assert result["median_ttft_ms"] > 0


async def test_up_session_next_step_is_prefilled_on_its_decode_worker(tiny_deployment, metric) -> None:
    """Decode affinity through the whole deployment (kv_aware is the default policy): an agent's
    step 2 (step 1's prompt + a tool result), naming step 1's session, is prefilled on the decode
    worker that ran step 1 — no KV moves — and gives the tokens the normal path gives."""
    url, dec = tiny_deployment.url, tiny_deployment.metrics["decode"]
    step1 = [(i * 53 + 7) % 48000 + 200 for i in range(200)]  # 6 full blocks of 32
    step2 = step1 + [(i * 31 + 5) % 48000 + 200 for i in range(40)]

    def complete(prompt: list[int], headers: dict) -> dict:
        r = httpx.post(f"{url}/v1/completions", timeout=180, headers=headers,
                       json={"model": "kvrelay-tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    def local_accepted() -> float:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        return metric(text, "kvrelay_router_local_prefill_total", reason="decode_affinity", outcome="accepted")

    def moved_bytes() -> float:
        # recorded when the import's notice arrives, which the decode worker awaits before it
        # streams the first token: final for a request once its response is complete
        return metric(httpx.get(dec, timeout=10).text, "kvrelay_kv_transfer_bytes_total")

    complete(step1, {"X-Session-Id": "agent-e2e"})
    before, moved = local_accepted(), moved_bytes()
    local = complete(step2, {"X-Session-Id": "agent-e2e"})
    assert local_accepted() == before + 1
    assert moved_bytes() == moved  # the session's step 2 moved no KV
    text = httpx.get(dec, timeout=10).text
    assert metric(text, "kvrelay_decode_local_prompt_tokens_total", source="cached") >= 192
    assert local["usage"]["prompt_tokens_details"]["cached_tokens"] >= 192  # step 1's blocks, not recomputed
    # the same prompt for another tenant (nothing cached, no session) takes the prefill path:
    # one transfer of step 2's 240 tokens (tiny: 2 KiB of KV a token; whole blocks of 32)
    normal = complete(step2, {"X-Kvrelay-Tenant": "other-tenant"})
    delta = moved_bytes() - moved
    assert 224 * 2048 <= delta <= 256 * 2048
    assert local["choices"][0]["text"] == normal["choices"][0]["text"]
    assert local_accepted() == before + 1


TOOL = {"type": "function", "function": {
    "name": "lookup", "description": "Look a country's capital up",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["country"],
                   "properties": {"country": {"type": "string", "enum": ["France", "Italy", "Norway"]}}}}}


@pytest.mark.parametrize("stream", [False, True])
def test_up_tiny_runs_a_tool_loop_through_the_openai_client(tiny_deployment, stream) -> None:
    """Even a random-weight model makes a valid call: the named choice is a grammar on both workers."""
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=f"{tiny_deployment.url}/v1", api_key="unused", timeout=300)
    messages = [{"role": "user", "content": "What is the capital of Italy?"}]
    kw = dict(model="kvrelay-tiny", messages=messages, tools=[TOOL], max_tokens=128, temperature=1.0,
              tool_choice={"type": "function", "function": {"name": "lookup"}})
    if stream:
        pieces, finish = {}, None
        for chunk in client.chat.completions.create(stream=True, **kw):
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                call = pieces.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                call["name"] += (tc.function.name or "") if tc.function else ""
                call["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
        call = pieces[0]
    else:
        reply = client.chat.completions.create(**kw)
        finish, tc = reply.choices[0].finish_reason, reply.choices[0].message.tool_calls[0]
        call = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
    assert finish == "stop" and call["id"] and call["name"] == "lookup"
    jsonschema.validate(json.loads(call["arguments"]), TOOL["function"]["parameters"])
    messages += [{"role": "assistant", "content": None,
                  "tool_calls": [{"id": call["id"], "type": "function",
                                  "function": {"name": "lookup", "arguments": call["arguments"]}}]},
                 {"role": "tool", "tool_call_id": call["id"], "content": "Rome"}]
    final = client.chat.completions.create(model="kvrelay-tiny", messages=messages, tools=[TOOL],
                                           tool_choice="none", max_tokens=8, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length") and not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens > len(messages)
