"""The benchmark clients against a tiny local SSE server (aiohttp) and a real nats-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import nats.errors
import pytest
from aiohttp import web

from kvrelay.loadtest.clients import HttpClient, NatsClient, chat_text
from kvrelay.loadtest.plan import BenchRequest
from kvrelay.schemas.codec import unpack, pack
from kvrelay.schemas.messages import ClientRequest, ErrorInfo, TokenChunk, Usage
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig

REQ = BenchRequest("r1", [5, 6, 7, 8], max_tokens=4, kind="test")


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class SseServer:
    """OpenAI-shaped streaming endpoints; ``mode`` picks the behaviour of the next requests."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.bodies: list[dict] = []
        self.sessions: list[str | None] = []  # X-Session-Id of each request
        self.never = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m-test", "object": "model"}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.sessions.append(request.headers.get("X-Session-Id"))
        if self.mode == "429" or (self.mode == "429-twice" and len(self.bodies) <= 2):
            return web.json_response({"error": {"message": "busy"}}, status=429, headers={"Retry-After": "0"})
        chat = request.path.endswith("chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.mode == "hang":
            await self.never.wait()

        def piece(text: str | None, reason: str | None = None) -> dict:
            c = {"index": 0, "finish_reason": reason}
            if chat:
                c["delta"] = {"content": text} if text is not None else {}
            else:
                c["text"] = text or ""
            return {"choices": [c], "usage": None}

        if chat:
            await resp.write(_sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
        for text in ("a", "b", "", "c"):  # the empty one: a token whose text is not ready yet
            await resp.write(_sse(piece(text)))
        if self.mode == "error":
            await resp.write(_sse({"error": {"message": "engine died", "code": "engine"}}))
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if self.mode == "cut":
            return resp
        await resp.write(_sse(piece(None, "length")))
        await resp.write(_sse({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 4,
                                                         "prompt_tokens_details": {"cached_tokens": 2}}}))
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def sse() -> AsyncIterator[tuple[SseServer, str]]:
    srv = SseServer()
    runner = web.AppRunner(srv.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield srv, f"http://{host}:{port}"
    finally:
        srv.never.set()
        await runner.cleanup()


async def test_http_client_streams_completion_with_usage(sse: tuple[SseServer, str]) -> None:
    srv, url = sse
    async with HttpClient(url + "/v1") as client:
        assert client.model == "m-test"
        rec = await client.send(REQ, scheduled_s=client.clock())
    assert rec.ok, rec.error_detail
    assert len(rec.chunks) == 3 and all(n == 1 for _, n in rec.chunks)  # 3 non-empty text events
    assert rec.output_tokens == 4 and rec.cached_tokens == 2  # from usage
    assert rec.ttft_ms() is not None and rec.tpot_ms() is not None
    body = srv.bodies[0]
    assert body["prompt"] == [5, 6, 7, 8] and body["max_tokens"] == 4 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert body["model"] == "m-test" and body["temperature"] == 0.0


@pytest.mark.parametrize("sessions", [False, True])
async def test_http_client_names_the_session_only_when_told(sse: tuple[SseServer, str], sessions: bool) -> None:
    srv, url = sse
    req = BenchRequest("s7-1", [5, 6], max_tokens=4, session_id="s7")
    async with HttpClient(url, model="m-test", sessions=sessions) as client:
        assert (await client.send(req, client.clock())).ok
        assert (await client.send(REQ, client.clock())).ok  # a request of no session: never a header
    assert srv.sessions == (["s7", None] if sessions else [None, None])
    assert "session_id" not in srv.bodies[0]  # a header: other OpenAI servers ignore it


async def test_http_client_chat_api(sse: tuple[SseServer, str]) -> None:
    srv, url = sse
    async with HttpClient(url, model="m-test", api="chat") as client:
        rec = await client.send(REQ, client.clock())
    assert rec.ok and len(rec.chunks) == 3  # the role-only opening chunk is not a token
    assert srv.bodies[0]["messages"] == [{"role": "user", "content": chat_text([5, 6, 7, 8])}]
    assert len(chat_text([5, 6, 7, 8]).split()) == 4


async def test_http_client_retries_push_back(sse: tuple[SseServer, str]) -> None:
    srv, url = sse
    srv.mode = "429-twice"
    async with HttpClient(url, model="m-test") as client:
        rec = await client.send(REQ, client.clock())
    assert rec.ok and rec.retries == 2 and len(srv.bodies) == 3


async def test_http_client_push_back_until_timeout(sse: tuple[SseServer, str]) -> None:
    srv, url = sse
    srv.mode = "429"
    async with HttpClient(url, model="m-test", timeout_s=0.3) as client:
        rec = await client.send(REQ, client.clock())
    assert rec.error == "timeout" and rec.retries >= 1


@pytest.mark.parametrize("mode, kind", [("429", "http_429"), ("error", "stream_error"),
                                        ("cut", "incomplete_stream")])
async def test_http_client_errors_by_kind(sse: tuple[SseServer, str], mode: str, kind: str) -> None:
    srv, url = sse
    srv.mode = mode
    async with HttpClient(url, model="m-test", retry_429=False) as client:
        rec = await client.send(REQ, client.clock())
    assert rec.error == kind and rec.end_s is not None


async def test_http_client_times_out(sse: tuple[SseServer, str]) -> None:
    srv, url = sse
    srv.mode = "hang"
    async with HttpClient(url, model="m-test", timeout_s=0.3) as client:
        rec = await client.send(REQ, client.clock())
    assert rec.error == "timeout"


async def test_http_client_connection_refused() -> None:
    async with HttpClient("http://127.0.0.1:9", model="m", connect_timeout_s=2) as client:
        rec = await client.send(REQ, client.clock())
    assert rec.error == "connection"


async def test_http_client_without_models_raises_connection_error() -> None:
    with pytest.raises(ConnectionError):
        async with HttpClient("http://127.0.0.1:9", connect_timeout_s=2):
            pass


# --- NATS ----------------------------------------------------------------------------------------------
async def _responder(bus: Bus, script: str, seen: list[ClientRequest], stop: asyncio.Event) -> None:
    """Plays the router + workers: answers each ClientRequest on its stream subject."""
    psub = await bus.js.pull_subscribe(bus.subjects.request_all, durable="bench-test")
    try:
        await _answer(bus, psub, script, seen, stop)
    finally:
        await psub.unsubscribe()


async def _answer(bus: Bus, psub: object, script: str, seen: list[ClientRequest],
                  stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            msgs = await psub.fetch(1, timeout=0.2)  # type: ignore[attr-defined]
        except nats.errors.TimeoutError:  # nothing yet
            continue
        for m in msgs:
            req = unpack(m.data, ClientRequest)
            seen.append(req)
            await m.ack()
            rid, subj = req.request_id, req.stream_subject
            if script == "error":
                chunks = [TokenChunk(request_id=rid, seq=0, finish_reason="error",
                                     error=ErrorInfo(code="overloaded", message="busy", status=429))]
            else:
                final = TokenChunk(request_id=rid, seq=2, token_ids=[10], finish_reason="length",
                                   usage=Usage(prompt_tokens=4, completion_tokens=4))
                mid = TokenChunk(request_id=rid, seq=1, token_ids=[8, 9])
                # "reorder": the final chunk overtakes the middle one (different publishers on core NATS)
                chunks = [TokenChunk(request_id=rid, seq=0, token_ids=[7])] + (
                    [final, mid] if script == "reorder" else [mid, final])
                if script == "gap":
                    chunks = [c for c in chunks if c.seq != 1]
            for c in chunks:
                await bus.nc.publish(subj, pack(c))
            await bus.nc.flush()


@pytest.fixture
async def bus(bus_config: BusConfig) -> AsyncIterator[Bus]:
    b = await Bus.connect(bus_config, "bench-test")
    await b.ensure_request_stream()
    try:
        yield b
    finally:
        await b.close()


async def _run_nats(bus: Bus, bus_config: BusConfig, script: str, **kw: float) -> tuple:
    seen: list[ClientRequest] = []
    stop = asyncio.Event()
    task = asyncio.create_task(_responder(bus, script, seen, stop))
    try:
        async with NatsClient(bus_config.url, namespace=bus_config.namespace, model="m", **kw) as client:
            rec = await client.send(REQ, client.clock())
    finally:
        stop.set()
        await task
    return rec, seen


@pytest.mark.parametrize("script", ["ok", "reorder"])
async def test_nats_client_collects_token_chunks(bus: Bus, bus_config: BusConfig, script: str) -> None:
    rec, seen = await _run_nats(bus, bus_config, script)
    assert rec.ok, rec.error_detail
    assert [n for _, n in rec.chunks] == ([1, 2, 1] if script == "ok" else [1, 1, 2])
    assert rec.output_tokens == 4
    req = seen[0]
    assert req.prompt_token_ids == [5, 6, 7, 8] and req.sampling.max_tokens == 4
    assert req.sampling.ignore_eos and req.sampling.temperature == 0.0 and req.model == "m"


@pytest.mark.parametrize("sessions", [False, True])
async def test_nats_client_names_the_session_only_when_told(bus: Bus, bus_config: BusConfig,
                                                            sessions: bool) -> None:
    seen: list[ClientRequest] = []
    stop = asyncio.Event()
    task = asyncio.create_task(_responder(bus, "ok", seen, stop))
    try:
        async with NatsClient(bus_config.url, namespace=bus_config.namespace, model="m",
                              sessions=sessions) as client:
            rec = await client.send(BenchRequest("s7-1", [5, 6], max_tokens=4, session_id="s7"), client.clock())
    finally:
        stop.set()
        await task
    assert rec.ok, rec.error_detail
    assert seen[0].session_id == ("s7" if sessions else "")


async def test_nats_client_error_chunk_gives_its_code(bus: Bus, bus_config: BusConfig) -> None:
    rec, _ = await _run_nats(bus, bus_config, "error")
    assert rec.error == "overloaded" and rec.error_detail == "busy"


async def test_nats_client_missing_chunk_is_an_error(bus: Bus, bus_config: BusConfig) -> None:
    rec, _ = await _run_nats(bus, bus_config, "gap", gap_grace_s=0.3)
    assert rec.error == "missing_chunks"


async def test_nats_client_no_stream(nats_url: str) -> None:
    async with NatsClient(nats_url, namespace="nostream", timeout_s=5, publish_timeout_s=2) as client:
        rec = await client.send(REQ, client.clock())
    assert rec.error == "no_stream"


async def test_nats_client_times_out_without_consumer(bus: Bus, bus_config: BusConfig) -> None:
    async with NatsClient(bus_config.url, namespace=bus_config.namespace, timeout_s=0.5) as client:
        rec = await client.send(REQ, client.clock())
    assert rec.error == "timeout"
