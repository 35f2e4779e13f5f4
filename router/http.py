"""The OpenAI-compatible HTTP API (aiohttp): chat and text completions, models, health, metrics.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics

Every error is OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``) with its
status: 400 bad input, 404 unknown model, 413 body too large, 429 router full: at
``max_inflight`` or its admission queue full (``Retry-After``), 503 no workers, 504 deadline (a
request no worker has room for waits in the admission queue until its first-token deadline). Errors after an SSE stream has started are sent as a last
``data: {"error": ...}`` event before ``data: [DONE]``. A client that disconnects cancels
its request on the bus (the handler is cancelled, the flight publishes ``Cancel``).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from kvrelay.base.logs import bound, get_logger
from kvrelay.router.chat_parsing import ChatFeatures, ChatPlan
from kvrelay.router.config import RouterConfig
from kvrelay.router.dispatcher import Dispatcher, Flight
from kvrelay.router.errors import BadRequest, ModelNotFound, PayloadTooLarge, RouterError
from kvrelay.router.metrics import CONTENT_TYPE, RouterMetrics
from kvrelay.router.openai_api import Api, ParsedRequest, parse, session_id
from kvrelay.router.openai_format import SSE_DONE, Shaper, sse, usage_dict
from kvrelay.router.tokenizer import RouterTokenizer
from kvrelay.router.tenants import Tenants
from kvrelay.schemas.messages import SamplingSpec, TokenChunk
from kvrelay.schemas.tenants import TenantSpec
from kvrelay.transport.discovery import Directory
from kvrelay.transport.subjects import check_token

log = get_logger(__name__)

TENANT_HEADER = "X-Kvrelay-Tenant"
TIMEOUT_HEADER = "X-Kvrelay-Timeout"
SESSION_HEADER = "X-Session-Id"
SHUTDOWN_TIMEOUT_S = 5.0


def error_response(exc: RouterError) -> web.Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return web.json_response(exc.body(), status=exc.status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    """Unknown routes and unexpected failures get OpenAI-shaped errors too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = RouterError(exc.reason or "error", code=f"http_{exc.status}")
        err.status, err.type = exc.status, "invalid_request_error"
        return error_response(err)
    except RouterError as exc:
        return error_response(exc)
    except ConnectionResetError:
        raise
    except Exception:
        log.exception("handler_failed", path=request.path)
        return error_response(RouterError("internal server error"))


class HttpApi:
    """The HTTP front of one router. ``start()`` returns the bound URL; ``stop()``."""

    def __init__(self, cfg: RouterConfig, dispatcher: Dispatcher, tokenizer: RouterTokenizer,
                 directory: Directory, metrics: RouterMetrics, model_name: str, chat: ChatFeatures,
                 tenants: Tenants) -> None:
        self.cfg, self.dispatcher, self.tokenizer, self.chat = cfg, dispatcher, tokenizer, chat
        self.tenants = tenants
        self.directory, self.metrics, self.model_name = directory, metrics, model_name
        self.created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[_errors])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._text)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> str:
        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.cfg.http_host, self.cfg.http_port)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        return self.url

    async def stop(self) -> None:
        """Stop accepting, then cancel the handlers still running (each cancels its request)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- small endpoints ------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kvrelay",
                "max_model_len": self.dispatcher.max_context(self.tokenizer.max_context)}
        return web.json_response({"object": "list", "data": [card]})

    async def _health(self, request: web.Request) -> web.Response:
        live = self.directory.live()
        prefill = sum(1 for w in live if w.role in ("prefill", "both"))
        decode = sum(1 for w in live if w.role in ("decode", "both"))
        ok = prefill > 0 and decode > 0
        body = {"status": "ok" if ok else "unavailable", "prefill_workers": prefill,
                "decode_workers": decode, "inflight": len(self.dispatcher.table)}
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # --- completions ------------------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "chat")

    async def _text(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "completions")

    async def _complete(self, request: web.Request, api: Api) -> web.StreamResponse:
        rid = uuid.uuid4().hex
        outcome = "disconnected"  # unless set below: the handler was cancelled or the client reset
        label = "unauthenticated"  # the tenant label of the metrics, once known
        try:
            with bound(request_id=rid):
                try:
                    body = await self._body(request)
                    parsed = parse(api, body)
                    if parsed.model != self.model_name:
                        raise ModelNotFound(f"the model {parsed.model!r} does not exist; this server serves "
                                            f"{self.model_name!r}", param="model")
                    tenant = self._tenant(request)
                    label = tenant.name if tenant else "open"
                    flight = self.dispatcher.open(rid, tenant.name if tenant else self._open_tenant(request),
                                                  self._timeout(request))
                    reason = "client disconnected"
                    try:
                        response, outcome = await self._run(request, parsed, flight, body, tenant)
                        return response
                    except RouterError as exc:
                        reason = exc.code
                        raise
                    finally:
                        await flight.close(reason)
                except RouterError as exc:
                    outcome = exc.code
                    return error_response(exc)
                finally:
                    self.metrics.tenant_requests.labels(label, outcome).inc()
        except Exception as exc:
            if not isinstance(exc, ConnectionResetError):
                outcome = "internal_error"
            raise
        finally:
            self.metrics.requests.labels(api, outcome).inc()

    async def _body(self, request: web.Request) -> object:
        limit = self.cfg.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes") from exc
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc

    def _tenant(self, request: web.Request) -> TenantSpec | None:
        """The request's tenant by its API key, with tenants configured; None on an open server."""
        if not self.tenants.enabled:
            return None
        return self.tenants.from_http(request.headers.get("Authorization"), request.headers.get(TENANT_HEADER))

    def _open_tenant(self, request: web.Request) -> str:
        tenant = request.headers.get(TENANT_HEADER, self.cfg.default_tenant)
        try:
            return check_token(tenant, "tenant")
        except ValueError as exc:
            raise BadRequest(f"header {TENANT_HEADER}: {exc}", param=TENANT_HEADER) from exc

    def _timeout(self, request: web.Request) -> float:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self.cfg.request_timeout_s
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not 0 < value <= 86400:
            raise BadRequest(f"header {TIMEOUT_HEADER} must be seconds in (0, 86400], got {raw!r}",
                             param=TIMEOUT_HEADER)
        return value

    def _session(self, request: web.Request, parsed: ParsedRequest) -> str:
        """The body's ``session_id`` or the ``X-Session-Id`` header (both given: they must agree)."""
        header = request.headers.get(SESSION_HEADER)
        if header is None:
            return parsed.session_id
        sid = session_id(header, SESSION_HEADER)
        if parsed.session_id and sid and sid != parsed.session_id:
            raise BadRequest(f"header {SESSION_HEADER} and 'session_id' name different sessions",
                             param=SESSION_HEADER)
        return sid or parsed.session_id

    async def _plan(self, api: Api, body: object) -> ChatPlan | None:
        """Tools, reasoning, response_format: validated and planned by vLLM's request model and parser."""
        assert isinstance(body, dict)  # parse() checked it
        if api != "chat":
            if body.get("response_format") is not None or body.get("tools"):
                raise BadRequest("response_format and tools are supported on /v1/chat/completions",
                                 param="response_format" if body.get("response_format") is not None else "tools")
            return None
        return await self.chat.plan(body) if self.chat.wanted(body) else None

    async def _tokens(self, parsed: ParsedRequest, plan: ChatPlan | None) -> list[int]:
        if parsed.messages is not None:
            return await self.tokenizer.encode_chat(self.chat.history(parsed.messages), plan.tools if plan else None,
                                                    self.chat.template)
        if parsed.prompt is not None:
            return await self.tokenizer.encode_prompt(parsed.prompt)
        ids = parsed.prompt_token_ids or []
        if any(t >= self.tokenizer.vocab_size for t in ids):
            raise BadRequest(f"token ids in 'prompt' must be below the vocabulary size "
                             f"{self.tokenizer.vocab_size}", param="prompt")
        return ids

    async def _run(self, request: web.Request, parsed: ParsedRequest, flight: Flight, body: object,
                   tenant: TenantSpec | None) -> tuple[web.StreamResponse, str]:
        plan = await self._plan(parsed.api, body)
        ids = await self._tokens(parsed, plan)
        max_context = self.dispatcher.max_context(self.tokenizer.max_context)
        sampling = parsed.sampling(len(ids), max_context, self.cfg.max_prompt_tokens,
                                   self.cfg.default_max_tokens)
        if plan is not None:
            plan.prompt_token_ids = ids
            sampling = sampling.replace(structured=plan.structured, skip_special_tokens=plan.skip_special_tokens)
        if tenant is None:
            return await self._serve(request, parsed, flight, ids, sampling, plan)
        charged = self.tenants.admit(tenant, len(ids), sampling.max_tokens, self.metrics)
        try:
            return await self._serve(request, parsed, flight, ids, sampling, plan)
        finally:
            self.tenants.quotas.release(tenant, charged, charged)

    async def _serve(self, request: web.Request, parsed: ParsedRequest, flight: Flight, ids: list[int],
                     sampling: SamplingSpec, plan: ChatPlan | None) -> tuple[web.StreamResponse, str]:
        subject, session = self.dispatcher.bus.subjects.tokens(flight.request_id), self._session(request, parsed)
        ttl = self.cfg.kv_ttl_s if parsed.kv_ttl_s is None else parsed.kv_ttl_s
        await self.dispatcher.admission.place(flight, lambda: flight.dispatch(ids, sampling, subject, session, ttl))
        first = await flight.next_chunk()  # errors before any output keep their HTTP status
        shaper = Shaper(parsed.api, flight.request_id, self.model_name, int(time.time()), parsed.include_usage)
        if parsed.stream:
            return await self._stream(request, flight, first, shaper, len(ids), plan)
        return await self._collect(flight, first, shaper, len(ids), plan), "ok"

    async def _collect(self, flight: Flight, chunk: TokenChunk, shaper: Shaper, prompt_tokens: int,
                       plan: ChatPlan | None) -> web.Response:
        texts, token_ids = [], []
        while True:
            texts.append(chunk.text)
            token_ids += chunk.token_ids
            if chunk.finish_reason is not None:
                break
            chunk = await flight.next_chunk()
        text, reason, message = "".join(texts), chunk.finish_reason, None
        if plan is not None:
            message, reason = plan.full(text, token_ids, reason)
        body = shaper.full(text, reason, _usage(chunk, prompt_tokens, len(token_ids)), message)
        return web.json_response(body)

    async def _stream(self, request: web.Request, flight: Flight, chunk: TokenChunk, shaper: Shaper,
                      prompt_tokens: int, plan: ChatPlan | None) -> tuple[web.StreamResponse, str]:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": flight.request_id})
        await resp.prepare(request)
        opening = shaper.opening()
        if opening is not None:
            await resp.write(sse(opening))
        produced = 0
        try:
            while True:
                produced += len(chunk.token_ids)
                if plan is not None:
                    fields = plan.delta(chunk.text, chunk.token_ids, chunk.finish_reason is not None)
                    if fields:
                        await resp.write(sse(shaper.delta_fields(fields)))
                elif chunk.text:
                    await resp.write(shaper.delta_sse(chunk.text))
                if chunk.finish_reason is not None:
                    break
                chunk = await flight.next_chunk()
        except RouterError as exc:
            await resp.write(sse(exc.body()))
            await resp.write(SSE_DONE)
            return resp, exc.code
        reason = chunk.finish_reason if plan is None else plan.finish_reason(chunk.finish_reason, plan.tools_streamed)
        await resp.write(sse(shaper.finish(reason)))
        if shaper.include_usage:
            await resp.write(sse(shaper.usage_chunk(_usage(chunk, prompt_tokens, produced))))
        await resp.write(SSE_DONE)
        await resp.write_eof()
        return resp, "ok"


def _usage(final: TokenChunk, prompt_tokens: int, produced: int) -> dict:
    """The worker's usage when it sent one, else what the router counted."""
    u = final.usage
    if u is None:
        return usage_dict(prompt_tokens, produced, 0)
    return usage_dict(u.prompt_tokens or prompt_tokens, u.completion_tokens or produced, u.cached_tokens)
