"""The HTTP API against a real nats-server, fake workers speaking the protocol, and aiohttp."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import aiohttp
import openai
import pytest
from kvrelay.router.policy import RoundRobin
from kvrelay.schemas.messages import Cancel

if TYPE_CHECKING:
    from conftest import Cluster

MODEL = "kvrelay-tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4}


async def _post(url: str, path: str, body: Any, headers: dict | None = None) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with s.post(url + path, data=data, headers=headers or {}) as r:
            return r.status, await r.json(content_type=None), dict(r.headers)


async def _sse(url: str, path: str, body: dict) -> tuple[int, list]:
    """The events of a streamed response: parsed JSON objects, then "[DONE]"."""
    events = []
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        if r.status != 200:
            return r.status, [await r.json()]
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            line = line.decode().strip()
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return r.status, events


def _prompt_len(cluster: Cluster, messages: list) -> int:
    return len(cluster.tokenizer.encode_chat_sync(messages))


async def _ready(cluster: Cluster, n_prefill: int = 1, mode: str = "ok", tokens: int = 4, **router_cfg):
    router = await cluster.router(**router_cfg)
    workers = [await cluster.worker(f"p{i}", mode, tokens=tokens) for i in range(n_prefill)]
    await cluster.worker("d0", role="decode")
    await cluster.seen(router, n_prefill, 1)
    return router, workers


async def test_http_chat_non_stream_returns_the_workers_text_and_usage(cluster: Cluster) -> None:
    router, (worker,) = await _ready(cluster)
    status, body, _ = await _post(router.url, "/v1/chat/completions", CHAT | {"unknown_field": {"x": 1}})
    assert status == 200, body
    p = _prompt_len(cluster, CHAT["messages"])
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"][0]["message"] == {"role": "assistant", "content": cluster.expected_text(p, 4)}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": p, "completion_tokens": 4, "total_tokens": p + 4,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    task = worker.tasks[0]
    assert task.prompt_token_ids == cluster.tokenizer.encode_chat_sync(CHAT["messages"])
    assert task.tenant == "default" and task.sampling.max_tokens == 4
    assert task.stream_subject == router.bus.subjects.tokens(task.request_id)
    assert task.router_id == router.id and task.deadline_ms > task.arrival_ms > 0
    await cluster.wait_until(lambda: len(router.dispatcher.table) == 0, what="in-flight table empty")


async def test_http_text_completion_with_token_ids_and_tenant(cluster: Cluster) -> None:
    router, (worker,) = await _ready(cluster)
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "stop": ["x"]}
    status, out, _ = await _post(router.url, "/v1/completions", body, {"X-Kvrelay-Tenant": "acme"})
    assert status == 200, out
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == cluster.expected_text(3, 3)
    task = worker.tasks[0]
    assert (task.prompt_token_ids, task.tenant, task.sampling.stop) == ([5, 6, 7], "acme", ["x"])


async def test_http_chat_stream_sends_openai_chunks_and_usage(cluster: Cluster) -> None:
    router, _ = await _ready(cluster)
    status, events = await _sse(router.url, "/v1/chat/completions",
                                CHAT | {"stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    p = _prompt_len(cluster, CHAT["messages"])
    assert text == cluster.expected_text(p, 4)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == p + 4


async def test_http_text_stream_reorders_out_of_order_chunks(cluster: Cluster) -> None:
    router, _ = await _ready(cluster, mode="shuffle", tokens=12)
    status, events = await _sse(router.url, "/v1/completions",
                                {"model": MODEL, "prompt": "Once upon", "max_tokens": 12, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    p = len(cluster.tokenizer.encode_prompt_sync("Once upon"))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cluster.expected_text(p, 12)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    dropped = router.metrics.chunks_dropped.labels("duplicate")._value.get()
    late = router.metrics.chunks_dropped.labels("late")._value.get()
    assert dropped + late == 2  # the two duplicates the worker sent


async def test_http_openai_client_streams_a_chat_completion(cluster: Cluster) -> None:
    router, _ = await _ready(cluster)
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT["messages"], max_tokens=5, stream=True,
            stream_options={"include_usage": True})
        parts, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        p = _prompt_len(cluster, CHAT["messages"])
        assert "".join(parts) == cluster.expected_text(p, 4)  # the fake worker stops after 4 tokens
        assert finish == "stop" and usage.completion_tokens == 4 and usage.prompt_tokens == p
        done = await client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert done.choices[0].text == cluster.expected_text(len(cluster.tokenizer.encode_prompt_sync("Hi")), 2)
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="gpt-4", prompt="Hi")
    finally:
        await client.close()


async def test_http_models_health_and_metrics(cluster: Cluster) -> None:
    router = await cluster.router()
    async with aiohttp.ClientSession() as s:
        async with s.get(router.url + "/health") as r:
            assert r.status == 503 and (await r.json())["prefill_workers"] == 0
        await cluster.worker("p0")
        await cluster.worker("d0", role="decode")
        await cluster.seen(router, 1, 1)
        async with s.get(router.url + "/health") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok", "prefill_workers": 1, "decode_workers": 1, "inflight": 0}
        async with s.get(router.url + "/v1/models") as r:
            body = await r.json()
            assert body["data"][0]["id"] == MODEL and body["data"][0]["max_model_len"] == 8192
        await _post(router.url, "/v1/chat/completions", CHAT)
        async with s.get(router.url + "/metrics") as r:
            text = await r.text()
            assert r.status == 200
            assert 'kvrelay_router_requests_total{api="chat",outcome="ok"} 1.0' in text
            for name in ("kvrelay_router_ttft_seconds_count 1.0", "kvrelay_router_e2e_seconds_count 1.0",
                         "kvrelay_router_inter_token_seconds_count 3.0", "kvrelay_router_inflight 0.0"):
                assert name in text


async def test_http_eight_concurrent_requests_all_complete(cluster: Cluster) -> None:
    router, workers = await _ready(cluster, n_prefill=2)
    bodies = [CHAT | {"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(8)]
    results = await asyncio.gather(*(_post(router.url, "/v1/chat/completions", b) for b in bodies))
    for body, (status, out, _) in zip(bodies, results):
        assert status == 200, out
        assert out["choices"][0]["message"]["content"] == cluster.expected_text(_prompt_len(cluster, body["messages"]), 4)
    assert sum(len(w.tasks) for w in workers) == 8
    assert len({out["id"] for _, out, _ in results}) == 8


async def test_http_load_is_counted_at_dispatch_so_a_burst_spreads(cluster: Cluster) -> None:
    router, workers = await _ready(cluster, n_prefill=2, mode="hold")
    pending = [asyncio.create_task(_post(router.url, "/v1/chat/completions", CHAT)) for _ in range(4)]
    await cluster.wait_until(lambda: sum(len(w.tasks) for w in workers) == 4, what="4 tasks dispatched")
    assert [len(w.tasks) for w in workers] == [2, 2]  # nothing finished, yet no pile-up on one worker
    assert [router.dispatcher.table.load(w.worker_id)[0] for w in workers] == [2, 2]
    for w in workers:
        w.release.set()
    assert all(status == 200 for status, _, _ in await asyncio.gather(*pending))
    assert len(router.dispatcher.table) == 0


async def test_http_client_disconnect_publishes_cancel(cluster: Cluster) -> None:
    router, (worker,) = await _ready(cluster, mode="first_then_stall")
    async with aiohttp.ClientSession() as s:
        r = await s.post(router.url + "/v1/chat/completions", json=CHAT | {"stream": True})
        assert r.status == 200
        await r.content.readline()  # the first event arrived: the stream is live
        r.close()  # the client goes away mid-stream
    await asyncio.wait_for(worker.cancelled.wait(), 10)
    assert worker.cancels == [worker.tasks[0].request_id]
    await cluster.wait_until(lambda: len(router.dispatcher.table) == 0, what="in-flight slot released")
    assert router.metrics.requests.labels("chat", "disconnected")._value.get() == 1


async def test_http_non_stream_disconnect_publishes_cancel(cluster: Cluster) -> None:
    router, (worker,) = await _ready(cluster, mode="stall")
    request = asyncio.create_task(_post(router.url, "/v1/chat/completions", CHAT))
    await asyncio.wait_for(worker.got_task.wait(), 10)
    request.cancel()  # closes the connection
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(worker.cancelled.wait(), 10)
    assert worker.cancels == [worker.tasks[0].request_id]


async def test_http_rejecting_worker_falls_back_to_the_next(cluster: Cluster) -> None:
    router = await cluster.router(policy=RoundRobin())
    busy = await cluster.worker("a-busy", "reject")
    ok = await cluster.worker("b-ok")
    await cluster.seen(router, 2)
    status, body, _ = await _post(router.url, "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert len(busy.tasks) == 1 and len(ok.tasks) == 1  # round robin tried a-busy first
    assert router.metrics.dispatch_rejections.labels("overloaded")._value.get() == 1


async def test_http_silent_worker_times_out_and_falls_back(cluster: Cluster) -> None:
    router = await cluster.router(policy=RoundRobin(), dispatch_timeout_s=0.3)
    silent = await cluster.worker("a-silent", "silent")
    ok = await cluster.worker("b-ok")
    await cluster.seen(router, 2)
    status, body, _ = await _post(router.url, "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert len(silent.tasks) == 1 and len(ok.tasks) == 1
    assert router.metrics.dispatch_rejections.labels("timeout")._value.get() == 1


async def test_http_all_workers_reject_is_429_with_retry_after_when_nothing_may_wait(cluster: Cluster) -> None:
    # with waiting (the default) such a request queues: tests/router/test_admission_http.py
    router, workers = await _ready(cluster, n_prefill=2, mode="reject", max_waiting=0)
    status, body, headers = await _post(router.url, "/v1/chat/completions", CHAT)
    assert status == 429
    assert body["error"]["message"].startswith("all prefill workers are busy")
    assert body["error"]["type"] == "rate_limit_error" and headers["Retry-After"] == "1"
    assert [len(w.tasks) for w in workers] == [1, 1]
    # refused everywhere: nothing to cancel. A marker sent after it on the router's own connection
    # arrives after any Cancel the router sent (one connection keeps its order): it comes alone.
    await router.bus.publish(router.bus.subjects.cancel("default", "marker"), Cancel(request_id="marker"))
    await cluster.wait_until(lambda: all(w.cancels for w in workers), what="the marker")
    assert [w.cancels for w in workers] == [["marker"], ["marker"]]


async def test_http_router_max_inflight_is_429(cluster: Cluster) -> None:
    router, (worker,) = await _ready(cluster, mode="hold", max_inflight=1)
    first = asyncio.create_task(_post(router.url, "/v1/chat/completions", CHAT))
    await asyncio.wait_for(worker.got_task.wait(), 10)
    status, body, headers = await _post(router.url, "/v1/chat/completions", CHAT)
    assert status == 429 and "Retry-After" in headers
    assert "1 requests in flight" in body["error"]["message"]
    worker.release.set()
    assert (await first)[0] == 200


async def test_http_no_workers_is_503(cluster: Cluster) -> None:
    router = await cluster.router()
    status, body, _ = await _post(router.url, "/v1/chat/completions", CHAT)
    assert status == 503 and body["error"]["code"] == "no_workers" and body["error"]["message"]


async def test_http_deadline_is_504_and_cancels(cluster: Cluster) -> None:
    router, (worker,) = await _ready(cluster, mode="stall")
    status, body, _ = await _post(router.url, "/v1/chat/completions", CHAT, {"X-Kvrelay-Timeout": "0.5"})
    assert status == 504 and body["error"]["code"] == "timeout"
    await asyncio.wait_for(worker.cancelled.wait(), 10)
    assert worker.tasks[0].deadline_ms - worker.tasks[0].arrival_ms <= 600


async def test_http_first_token_timeout_is_504(cluster: Cluster) -> None:
    router, _ = await _ready(cluster, mode="stall", first_token_timeout_s=0.3)
    status, body, _ = await _post(router.url, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 504 and "no first token" in body["error"]["message"]


async def test_http_worker_error_keeps_its_status_before_streaming(cluster: Cluster) -> None:
    router, _ = await _ready(cluster, mode="error")
    for stream in (False, True):
        status, body, _ = await _post(router.url, "/v1/chat/completions", CHAT | {"stream": stream})
        assert status == 503 and body["error"]["message"] == "the engine fell over"


async def test_http_worker_error_mid_stream_is_an_sse_error_event(cluster: Cluster) -> None:
    router, _ = await _ready(cluster, mode="first_then_error")
    status, events = await _sse(router.url, "/v1/chat/completions", CHAT | {"stream": True})
    assert status == 200
    assert events[-2]["error"]["message"] == "the KV transfer failed" and events[-1] == "[DONE]"


BAD = [
    ("/v1/chat/completions", b"{not json", {}, 400, "invalid_json"),
    ("/v1/chat/completions", [1, 2], {}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL}, {}, 400, "missing_required_parameter"),
    ("/v1/chat/completions", CHAT | {"model": "gpt-4"}, {}, 404, "model_not_found"),
    ("/v1/chat/completions", CHAT | {"messages": "hi"}, {}, 400, "invalid_type"),
    ("/v1/chat/completions", CHAT | {"max_tokens": "4"}, {}, 400, "invalid_type"),
    ("/v1/chat/completions", CHAT | {"max_tokens": 100000}, {}, 400, "invalid_value"),
    ("/v1/chat/completions", CHAT | {"max_tokens": 8190}, {}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", CHAT | {"temperature": 3}, {}, 400, "invalid_value"),
    ("/v1/chat/completions", CHAT | {"n": 3}, {}, 400, "invalid_value"),
    ("/v1/chat/completions", CHAT | {"stop": {"a": 1}}, {}, 400, "invalid_type"),
    ("/v1/chat/completions", CHAT, {"X-Kvrelay-Tenant": "a.b"}, 400, "invalid_value"),
    ("/v1/chat/completions", CHAT, {"X-Kvrelay-Timeout": "soon"}, 400, "invalid_value"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": "word " * 300}]}, {}, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", CHAT | {"pad": "x" * 9000}, {}, 413, "request_too_large"),
    ("/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}, {}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, {}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, {}, 400, "invalid_value"),
]


async def test_http_bad_input_gets_4xx_while_a_good_request_completes(cluster: Cluster) -> None:
    router, (worker,) = await _ready(cluster, mode="hold", max_prompt_tokens=256, max_body_bytes=8192)
    good = asyncio.create_task(_post(router.url, "/v1/chat/completions", CHAT))
    await asyncio.wait_for(worker.got_task.wait(), 10)
    results = await asyncio.gather(*(_post(router.url, path, body, headers) for path, body, headers, _, _ in BAD))
    for (path, body, _, status, code), (got, out, _) in zip(BAD, results):
        assert (got, out["error"]["code"]) == (status, code), (body if len(str(body)) < 200 else path, out)
        assert out["error"]["message"] and out["error"]["type"]
    worker.release.set()
    status, out, _ = await good
    assert status == 200 and out["choices"][0]["message"]["content"]
    assert len(worker.tasks) == 1  # no bad request reached a worker


async def test_http_unknown_route_and_method_are_openai_shaped(cluster: Cluster) -> None:
    router = await cluster.router()
    async with aiohttp.ClientSession() as s:
        async with s.get(router.url + "/v1/nothing") as r:
            assert r.status == 404 and (await r.json())["error"]["message"]
        async with s.get(router.url + "/v1/chat/completions") as r:
            assert r.status == 405 and (await r.json())["error"]["message"]
