"""Benchmark clients: OpenAI-compatible HTTP (SSE streaming) and kvrelay's NATS intake.

Both turn one ``BenchRequest`` into one ``RequestRecord`` (``metrics.py``) and never raise for a
failed request: the record's ``error`` names the kind (``http_<status>``, ``timeout``,
``connection``, ``stream_error``, ``incomplete_stream``, ``no_output``, ``overloaded``,
``no_stream``, or the server's error code on NATS). Every request is bounded by ``timeout_s``.

HTTP: a 429 (push back) is retried after its ``Retry-After`` until the request's timeout (counted
in ``RequestRecord.retries``; the wait is part of the latency). ``POST /v1/completions`` with the
prompt as token ids (exact lengths and prefixes), or ``POST /v1/chat/completions`` with a text
rendering of them; ``stream: true``,
``stream_options.include_usage: true``, ``temperature`` 0 and ``ignore_eos`` (so outputs have
``max_tokens`` tokens). With ``sessions=True`` each request names its session (HTTP header
``X-Session-Id``, which other OpenAI-compatible servers ignore; NATS ``ClientRequest.session_id``),
so kvrelay can send a session's next step to the decode worker of its last (local prefill). Each non-empty content event counts as one token arrival; the final usage
gives the output token count.

NATS: a ``ClientRequest`` (``prompt_token_ids``) published with JetStream on
``kvrelay.<ns>.req.<tenant>``, its tokens collected from a fresh inbox subject as ``TokenChunk``
messages; each chunk's ``token_ids`` are its tokens (arriving together). The stream ends at the
chunk with ``finish_reason`` once every earlier ``seq`` arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp

from kvrelay.loadtest.metrics import RequestRecord
from kvrelay.loadtest.plan import BenchRequest

DETAIL_CHARS = 300
SESSION_HEADER = "X-Session-Id"  # kvrelay's session header (router/http.py)
MAX_RETRY_AFTER_S = 30.0  # the longest Retry-After honoured at once (the request's timeout still bounds it)
# words the chat API renders token ids with (about one model token each for common tokenizers)
_WORDS = ("time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world",
          "school", "state", "family", "student", "group", "country", "problem", "hand", "part", "place")


def _retry_after(value: str | None) -> float:
    """Seconds to wait from a Retry-After header (seconds form; 1 s when absent or unreadable)."""
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S) if value is not None else 1.0
    except ValueError:
        return 1.0


def chat_text(token_ids: list[int]) -> str:
    """A deterministic text of about ``len(token_ids)`` tokens (chat prompts must be text)."""
    return " ".join(_WORDS[t % len(_WORDS)] for t in token_ids)


class HttpClient:
    """An OpenAI-compatible streaming client. Use ``async with``; ``model`` defaults to /v1/models."""

    def __init__(self, base_url: str, *, model: str | None = None, api: str = "completions",
                 timeout_s: float = 600.0, connect_timeout_s: float = 10.0, max_connections: int = 1024,
                 ignore_eos: bool = True, headers: dict[str, str] | None = None, retry_429: bool = True,
                 sessions: bool = False, clock: Any = time.monotonic) -> None:
        if api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {api!r}")
        self.base = base_url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.model, self.api, self.timeout_s = model, api, timeout_s
        self.connect_timeout_s, self.max_connections = connect_timeout_s, max_connections
        self.ignore_eos, self.headers, self.clock = ignore_eos, dict(headers or {}), clock
        self.retry_429, self.sessions = retry_429, sessions
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
            headers=self.headers)
        if self.model is None:
            try:
                models = await self.models()
                if not models:
                    raise ConnectionError(f"{self.base}/v1/models lists no model")
            except BaseException:
                await self.__aexit__(None, None, None)
                raise
            self.model = models[0]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use 'async with HttpClient(...)'")
        return self._session

    async def models(self) -> list[str]:
        async def get() -> Any:
            async with self.session.get(f"{self.base}/v1/models") as r:
                r.raise_for_status()
                return await r.json()

        try:
            body = await asyncio.wait_for(get(), self.connect_timeout_s + 10)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise ConnectionError(f"cannot list models at {self.base}/v1/models: {exc!r}") from exc
        return [m["id"] for m in body.get("data", []) if isinstance(m, dict) and "id" in m]

    def body(self, req: BenchRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.max_tokens, "stream": True,
                                "stream_options": {"include_usage": True}, "temperature": 0.0}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": chat_text(req.prompt_token_ids)}]
            return "/v1/chat/completions", body
        body["prompt"] = req.prompt_token_ids
        return "/v1/completions", body

    async def send(self, req: BenchRequest, scheduled_s: float) -> RequestRecord:
        rec = RequestRecord(req.request_id, scheduled_s, self.clock(), req.kind, len(req.prompt_token_ids),
                            req.max_tokens)
        path, body = self.body(req)
        headers = {SESSION_HEADER: req.session_id} if self.sessions and req.session_id else None
        try:
            await asyncio.wait_for(self._stream(path, body, rec, headers), self.timeout_s)
        except asyncio.TimeoutError:
            rec.error, rec.error_detail = "timeout", f"no complete answer within {self.timeout_s:g}s"
        except aiohttp.ClientError as exc:
            rec.error, rec.error_detail = "connection", repr(exc)[:DETAIL_CHARS]
        rec.end_s = self.clock()
        return rec

    async def _stream(self, path: str, body: dict[str, Any], rec: RequestRecord,
                      headers: dict[str, str] | None = None) -> None:
        while True:
            async with self.session.post(self.base + path, json=body, headers=headers) as resp:
                if resp.status == 429 and self.retry_429:
                    # push back: wait as told, then try again (the wait counts in the latency)
                    rec.retries += 1
                    wait = _retry_after(resp.headers.get("Retry-After"))
                else:
                    await self._read(resp, rec)
                    return
            await asyncio.sleep(wait)

    async def _read(self, resp: aiohttp.ClientResponse, rec: RequestRecord) -> None:
        if resp.status != 200:
            rec.error = f"http_{resp.status}"
            rec.error_detail = (await resp.text())[:DETAIL_CHARS]
            return
        done = False
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            if not self._event(data, rec):
                return
        if not done:
            rec.error, rec.error_detail = "incomplete_stream", "the stream ended without [DONE]"
        elif rec.first_token_s() is None:
            rec.error, rec.error_detail = "no_output", "the stream carried no output text"

    def _event(self, data: bytes, rec: RequestRecord) -> bool:
        """Apply one SSE event to the record; False when it ends the request with an error."""
        now = self.clock()
        try:
            obj = json.loads(data)
        except ValueError:
            rec.error, rec.error_detail = "bad_event", data[:DETAIL_CHARS].decode(errors="replace")
            return False
        if not isinstance(obj, dict):
            return True
        if "error" in obj:
            err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            rec.error, rec.error_detail = "stream_error", str(err.get("message", ""))[:DETAIL_CHARS]
            return False
        for choice in obj.get("choices") or []:
            if self.api == "completions":
                text = choice.get("text")
            else:
                text = (choice.get("delta") or {}).get("content")
            if text:
                rec.chunks.append((now, 1))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            rec.usage_output_tokens = usage.get("completion_tokens")
            if usage.get("prompt_tokens"):
                rec.prompt_tokens = usage["prompt_tokens"]
            details = usage.get("prompt_tokens_details") or {}
            rec.cached_tokens = details.get("cached_tokens") if isinstance(details, dict) else None
        return True


class NatsClient:
    """kvrelay's NATS intake as a client. Use ``async with``."""

    def __init__(self, nats_url: str, *, namespace: str = "default", model: str = "",
                 timeout_s: float = 600.0, publish_timeout_s: float = 10.0, gap_grace_s: float = 2.0,
                 sessions: bool = False, clock: Any = time.monotonic) -> None:
        from kvrelay.transport.subjects import Subjects

        self.url, self.model, self.timeout_s = nats_url, model, timeout_s
        self.subjects = Subjects(namespace)
        self.publish_timeout_s, self.gap_grace_s, self.clock = publish_timeout_s, gap_grace_s, clock
        self.sessions = sessions
        self._nc: Any = None
        self._js: Any = None
        self._n = 0

    async def __aenter__(self) -> NatsClient:
        import nats

        try:
            self._nc = await nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=3,
                                          allow_reconnect=True)
        except (OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
            raise ConnectionError(f"cannot connect to NATS at {self.url}: {exc!r}") from exc
        self._js = self._nc.jetstream(timeout=self.publish_timeout_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        import nats.errors

        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), 5.0)
            except (nats.errors.Error, asyncio.TimeoutError):
                await nc.close()

    def _request_id(self, req: BenchRequest) -> str:
        self._n += 1
        safe = "".join(c if c.isalnum() or c in "_-" else "-" for c in req.request_id)[:40]
        return f"{safe}-{self._n}-{id(self) & 0xFFFF:x}"

    async def send(self, req: BenchRequest, scheduled_s: float) -> RequestRecord:
        import nats.errors
        import nats.js.errors

        from kvrelay.schemas.codec import pack
        from kvrelay.schemas.messages import ClientRequest, SamplingSpec

        rec = RequestRecord(req.request_id, scheduled_s, self.clock(), req.kind, len(req.prompt_token_ids),
                            req.max_tokens)
        inbox, sub = self._nc.new_inbox(), None
        try:
            sub = await self._nc.subscribe(inbox, pending_msgs_limit=req.max_tokens + 64)
            msg = ClientRequest(request_id=self._request_id(req), stream_subject=inbox, model=self.model,
                                prompt_token_ids=list(req.prompt_token_ids),
                                sampling=SamplingSpec(max_tokens=req.max_tokens, temperature=0.0,
                                                      ignore_eos=True),
                                timeout_s=min(self.timeout_s, 3600.0),
                                session_id=req.session_id if self.sessions else "")
            try:
                await self._js.publish(self.subjects.request(req.tenant), pack(msg))
            except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
                rec.error, rec.error_detail = "no_stream", "no JetStream stream takes the request subject"
                return rec
            except nats.js.errors.APIError as exc:
                rec.error, rec.error_detail = "overloaded", repr(exc)[:DETAIL_CHARS]
                return rec
            await asyncio.wait_for(self._collect(sub, rec), self.timeout_s)
        except asyncio.TimeoutError:
            rec.error = rec.error or "timeout"
            rec.error_detail = rec.error_detail or f"no complete answer within {self.timeout_s:g}s"
        except nats.errors.Error as exc:
            rec.error, rec.error_detail = "connection", repr(exc)[:DETAIL_CHARS]
        finally:
            rec.end_s = self.clock()
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        return rec

    async def _collect(self, sub: Any, rec: RequestRecord) -> None:
        import nats.errors

        from kvrelay.schemas.codec import unpack
        from kvrelay.schemas.errors import SchemaError
        from kvrelay.schemas.messages import TokenChunk

        seen: set[int] = set()
        final: int | None = None
        while final is None or len(seen) < final + 1:
            wait = self.timeout_s if final is None else self.gap_grace_s
            try:
                m = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                if final is None:
                    rec.error, rec.error_detail = "timeout", f"no complete answer within {self.timeout_s:g}s"
                else:
                    rec.error, rec.error_detail = "missing_chunks", f"got {len(seen)} of {final + 1} chunks"
                return
            now = self.clock()
            try:
                chunk = unpack(m.data, TokenChunk)
            except SchemaError as exc:
                rec.error, rec.error_detail = "bad_chunk", str(exc)[:DETAIL_CHARS]
                return
            seen.add(chunk.seq)
            if chunk.token_ids:
                rec.chunks.append((now, len(chunk.token_ids)))
            if chunk.error is not None:
                rec.error = chunk.error.code or "stream_error"
                rec.error_detail = chunk.error.message[:DETAIL_CHARS]
                return
            if chunk.finish_reason is not None:
                final = chunk.seq
                if chunk.usage is not None:
                    rec.usage_output_tokens = chunk.usage.completion_tokens or None
                    rec.cached_tokens = chunk.usage.cached_tokens
                    if chunk.usage.prompt_tokens:
                        rec.prompt_tokens = chunk.usage.prompt_tokens
        if rec.first_token_s() is None:
            rec.error, rec.error_detail = "no_output", "the stream carried no tokens"
