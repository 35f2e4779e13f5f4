"""The NATS intake: requests from pub/sub clients, through a bounded JetStream work queue.

Clients publish a ``ClientRequest`` with JetStream publish on ``kvrelay.<ns>.req.<tenant>``.
The stream (``bus.ensure_request_stream``) is bounded with ``discard=new``: a client
publishing into a full stream gets a JetStream error, which is the push back. Router replicas
share one durable pull consumer (``router``) and fetch only while they have room (at most
``intake_max_inflight`` requests each, from fetch to the request's last token).

Per message: undecodable or invalid -> an error ``TokenChunk`` (status 400) on the
``stream_subject`` when one can be recovered, ``term()``, counted. Valid -> tokenize and
dispatch with the client's ``stream_subject`` (the workers publish tokens straight to it),
``ack()``, then follow the stream to track completion and enforce the deadline: past it the
router publishes a final error chunk (code ``timeout``) to the client and a ``Cancel``.
Every worker refused -> the request waits in the router's admission queue
(router/admission.py, shared with HTTP: one FIFO) for at most half ``intake_ack_wait_s``. No
live worker, router at ``max_inflight``, admission queue full or that wait over -> ``nak`` with
``intake_retry_delay_s`` so the request waits in the stream, until its deadline; then an error
chunk. (When a worker did not answer in time it may run the task, so the request is cancelled
and failed with 429 instead of being retried: it never runs twice.) Other errors -> an
error chunk with the HTTP status they map to, ``term()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec

from kvrelay.base.logs import bound, get_logger
from kvrelay.router.chat_parsing import ChatFeatures, ChatPlan
from kvrelay.router.config import RouterConfig
from kvrelay.router.dispatcher import Dispatcher, Flight
from kvrelay.router.errors import (
    BadRequest,
    DeadlineExceeded,
    ModelNotFound,
    NoWorkersAvailable,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    RouterError,
    WorkerLost,
)
from kvrelay.router.metrics import RouterMetrics
from kvrelay.router.openai_api import fit_lengths
from kvrelay.router.tenants import Tenants
from kvrelay.router.tokenizer import RouterTokenizer
from kvrelay.schemas.tenants import TenantSpec
from kvrelay.schemas.codec import raw_body, unpack
from kvrelay.schemas.errors import SchemaError
from kvrelay.schemas.messages import MAX_ID_LEN, ChatMessage, ClientRequest, TokenChunk, ToolCallDelta
from kvrelay.transport.bus import Bus
from kvrelay.transport.errors import BusUnavailable, TransportError
from kvrelay.transport.jetstream import ConsumerSpec, Delivery, PullConsumer
from kvrelay.transport.subjects import check_subject, check_token

log = get_logger(__name__)

FETCH_TIMEOUT_S = 1.0
ERROR_BACKOFF_S = 1.0


class Intake:
    """Consumes the request stream until cancelled; owns (cancels and awaits) its request tasks."""

    def __init__(self, bus: Bus, dispatcher: Dispatcher, tokenizer: RouterTokenizer, cfg: RouterConfig,
                 metrics: RouterMetrics, model_name: str, chat: ChatFeatures, tenants: Tenants) -> None:
        self.bus, self.dispatcher, self.tokenizer, self.chat = bus, dispatcher, tokenizer, chat
        self.tenants = tenants
        self.cfg, self.metrics, self.model_name = cfg, metrics, model_name
        self._tasks: set[asyncio.Task] = set()
        self.ready = asyncio.Event()  # set once the stream and consumer exist
        self.fetch_timeout_s = FETCH_TIMEOUT_S
        self.idle_fetches = 0  # fetches that found nothing (the loop is alive)

    async def run(self) -> None:
        await self.bus.ensure_request_stream()
        psub = await self._subscribe()
        self.ready.set()
        try:
            while True:
                room = self.cfg.intake_max_inflight - len(self._tasks)
                if room <= 0:
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                msgs = await self._fetch(psub, room)
                for msg in msgs:
                    task = asyncio.create_task(self._guarded(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(TransportError):
                await psub.unsubscribe()

    async def _fetch(self, psub: PullConsumer, room: int) -> list[Delivery]:
        """Up to ``room`` requests; [] when none came within ``fetch_timeout_s``."""
        try:
            msgs = await psub.fetch(room, self.fetch_timeout_s)
        except TransportError as exc:
            log.warning("intake_fetch_failed", error=repr(exc))
            await asyncio.sleep(ERROR_BACKOFF_S)  # back off before fetching again
            return []
        if not msgs:
            self.idle_fetches += 1
        return msgs

    async def _subscribe(self) -> PullConsumer:
        s = self.bus.subjects
        spec = ConsumerSpec(durable=s.consumer_router, filter_subject=s.request_all,
                            ack_wait_s=self.cfg.intake_ack_wait_s, max_ack_pending=-1)
        return await self.bus.pull_consumer(s.stream_requests, spec, update=False)

    async def _guarded(self, msg: Delivery) -> None:
        try:
            await self._handle(msg)
        except TransportError as exc:
            log.warning("intake_request_failed", error=repr(exc))
        except Exception:
            log.exception("intake_request_crashed")

    # --- one message --------------------------------------------------------------------------------
    async def _handle(self, msg: Delivery) -> None:
        tenant = msg.subject.rsplit(".", 1)[-1]
        arrival_ms = _arrival_ms(msg)
        try:
            req = self._decode(msg.data, tenant)
        except RouterError as exc:
            self.metrics.intake_invalid.inc()
            self.metrics.requests.labels("nats", exc.code).inc()
            subject, rid = recover_reply_to(msg.data, self.bus.subjects.root)
            log.info("intake_invalid", error=exc.message, stream_subject=subject)
            if subject:
                await self._send_error(subject, rid, 0, exc)
            await msg.term()
            return
        try:
            spec = self._authorize(req, tenant)
        except RouterError as exc:  # no reply: the stream subject is not the tenant's to name
            self.metrics.requests.labels("nats", exc.code).inc()
            log.warning("intake_refused", tenant=tenant, error=exc.message)
            await msg.term()
            return
        with bound(request_id=req.request_id):
            await self._serve(msg, req, tenant, arrival_ms, spec)

    def _authorize(self, req: ClientRequest, tenant: str) -> TenantSpec | None:
        """With tenants: the subject's tenant (only it may publish there), and a stream subject in its space."""
        if not self.tenants.enabled:
            return None
        spec = self.tenants.from_subject(tenant)
        prefix = self.bus.subjects.client(tenant) + "."
        if not req.stream_subject.startswith(prefix):
            raise PermissionDenied(f"stream_subject must start with {prefix} (the subjects tenant {tenant!r} "
                                   f"may subscribe to)")
        return spec

    def _decode(self, data: bytes, tenant: str) -> ClientRequest:
        try:
            req = unpack(data, ClientRequest)
            check_token(tenant, "tenant")
            check_token(req.request_id, "request_id")
            check_reply_subject(req.stream_subject, self.bus.subjects.root)
        except (SchemaError, ValueError) as exc:
            raise BadRequest(str(exc)) from exc
        if req.model and req.model != self.model_name:
            raise ModelNotFound(f"the model {req.model!r} does not exist; this server serves {self.model_name!r}")
        return req

    async def _serve(self, msg: Delivery, req: ClientRequest, tenant: str, arrival_ms: int,
                     spec: TenantSpec | None) -> None:
        try:
            flight = self.dispatcher.open(req.request_id, tenant, req.timeout_s, arrival_ms)
        except Overloaded as exc:
            await self._requeue_or_fail(msg, req, arrival_ms, exc)
            return
        except RouterError as exc:
            await self._fail(msg, req, exc)
            return
        charged = 0
        try:
            try:
                plan, charged = await self._dispatch(flight, req, spec)
            except QuotaExceeded as exc:  # the tenant's limit: tell the client, do not retry
                await flight.close(exc.code)
                await self._fail(msg, req, exc)
                return
            except (Overloaded, NoWorkersAvailable) as exc:
                if flight.maybe_taken:  # a worker that did not answer may run it: never run it twice
                    await flight.close(exc.code)
                    await self._fail(msg, req, exc)
                    return
                await flight.close(exc.code, cancel=False)
                await self._requeue_or_fail(msg, req, arrival_ms, exc)
                return
            except RouterError as exc:
                await flight.close(exc.code)
                await self._fail(msg, req, exc)
                return
            await msg.ack()
            try:
                await (self._follow(flight, req) if plan is None else self._relay(flight, req, plan))
            except asyncio.CancelledError:
                await flight.close(cancel=False)  # the router stops; the workers still serve the client
                raise
        finally:
            if spec is not None and charged:
                self.tenants.quotas.release(spec, charged, charged)
            await flight.close()

    async def _dispatch(self, flight: Flight, req: ClientRequest, spec: TenantSpec | None
                        ) -> tuple[ChatPlan | None, int]:
        """Tokenize, check the tenant's quotas and dispatch: the request's chat plan when its output is
        parsed (then relayed), and the tokens charged to its tenant."""
        plan = None
        if req.messages is not None:
            body = chat_body(req)
            plan = await self.chat.plan(body) if self.chat.wanted(body) else None
            ids = await self.tokenizer.encode_chat(self.chat.history(body["messages"]), plan.tools if plan else None,
                                                   self.chat.template)
        elif req.prompt is not None:
            ids = await self.tokenizer.encode_prompt(req.prompt)
        else:
            ids = req.prompt_token_ids or []
            if any(t < 0 or t >= self.tokenizer.vocab_size for t in ids):
                raise BadRequest(f"prompt_token_ids must be in [0, {self.tokenizer.vocab_size})")
        max_tokens = fit_lengths(len(ids), req.sampling.max_tokens,
                                 self.dispatcher.max_context(self.tokenizer.max_context),
                                 self.cfg.max_prompt_tokens, self.cfg.default_max_tokens)
        sampling = req.sampling.replace(max_tokens=max_tokens)
        subject = req.stream_subject
        ttl = self.cfg.kv_ttl_s if req.kv_ttl_s is None else req.kv_ttl_s
        if plan is not None:  # the workers stream to the router, which parses and relays to the client
            plan.prompt_token_ids = ids
            sampling = sampling.replace(structured=plan.structured, skip_special_tokens=plan.skip_special_tokens)
            subject = self.bus.subjects.tokens(flight.request_id)
        charged = self.tenants.admit(spec, len(ids), sampling.max_tokens, self.metrics) if spec else 0
        try:
            await self.dispatcher.admission.place(
                flight, lambda: flight.dispatch(ids, sampling, subject, req.session_id, ttl),
                max_wait_s=self.cfg.intake_ack_wait_s / 2)  # acknowledged before the stream redelivers it
        except BaseException:
            if spec is not None and charged:
                self.tenants.quotas.release(spec, charged, charged)
            raise
        return plan, charged

    async def _relay(self, flight: Flight, req: ClientRequest, plan: ChatPlan) -> None:
        """Parse the workers' chunks and publish them, same ``seq``, to the client's subject."""
        outcome = "ok"
        try:
            while True:
                chunk = await flight.next_chunk()
                done = chunk.finish_reason is not None
                fields = plan.delta(chunk.text, chunk.token_ids, done) or {}
                reason = plan.finish_reason(chunk.finish_reason, plan.tools_streamed) if done else None
                await self.bus.publish(req.stream_subject, relayed(chunk, fields, reason))
                if done:
                    break
        except RouterError as exc:
            outcome = exc.code
            if isinstance(exc, (DeadlineExceeded, WorkerLost)):
                await flight.close("timeout" if isinstance(exc, DeadlineExceeded) else exc.code)
            await self._send_error(req.stream_subject, req.request_id, flight.next_seq, exc)
        self.metrics.requests.labels("nats", outcome).inc()

    async def _follow(self, flight: Flight, req: ClientRequest) -> None:
        """Read the stream the client gets, to its end or its deadline."""
        outcome = "ok"
        try:
            while (await flight.next_chunk()).finish_reason is None:
                pass
        except (DeadlineExceeded, WorkerLost) as exc:  # no worker told the client: the router does
            outcome = exc.code
            await flight.close("timeout" if isinstance(exc, DeadlineExceeded) else exc.code)
            await self._send_error(req.stream_subject, req.request_id, flight.next_seq, exc)
        except RouterError as exc:  # the worker's error chunk went to the client already
            outcome = exc.code
        self.metrics.requests.labels("nats", outcome).inc()

    async def _requeue_or_fail(self, msg: Delivery, req: ClientRequest, arrival_ms: int, exc: RouterError) -> None:
        delay = self.cfg.intake_retry_delay_s
        deadline_ms = arrival_ms + 1000 * min(req.timeout_s, self.cfg.request_timeout_s)
        if time.time() * 1000 + delay * 1000 < deadline_ms:
            self.metrics.intake_requeued.inc()
            await msg.nak(delay=delay)
            return
        await self._fail(msg, req, exc)

    async def _fail(self, msg: Delivery, req: ClientRequest, exc: RouterError) -> None:
        self.metrics.requests.labels("nats", exc.code).inc()
        await self._send_error(req.stream_subject, req.request_id, 0, exc)
        await msg.term()

    async def _send_error(self, subject: str, request_id: str, seq: int, exc: RouterError) -> None:
        chunk = TokenChunk(request_id=request_id, seq=seq, finish_reason="error", error=exc.info(),
                           sent_ms=int(time.time() * 1000))
        try:
            await self.bus.publish(subject, chunk)
        except BusUnavailable as err:
            log.warning("error_chunk_failed", subject=subject, error=str(err))


def chat_body(req: ClientRequest) -> dict:
    """A chat ``ClientRequest`` as the OpenAI body vLLM's request model validates."""
    body: dict = {"model": req.model or "kvrelay", "include_reasoning": req.include_reasoning,
                  "messages": [_message(m) for m in req.messages or ()]}
    for key in ("tools", "tool_choice", "parallel_tool_calls", "response_format"):
        value = getattr(req, key)
        if value is not None:
            body[key] = msgspec.to_builtins(value)
    return body


def _message(m: ChatMessage) -> dict:
    out: dict = {"role": m.role, "content": m.content or ""}
    if m.tool_calls:
        out["tool_calls"] = msgspec.to_builtins(m.tool_calls)
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def relayed(chunk: TokenChunk, fields: dict, finish_reason: str | None) -> TokenChunk:
    """A worker's chunk with its text parsed: content, reasoning and tool-call pieces."""
    calls = [ToolCallDelta(index=c.get("index", 0), id=c.get("id") or "",
                           name=(c.get("function") or {}).get("name") or "",
                           arguments=(c.get("function") or {}).get("arguments") or "")
             for c in fields.get("tool_calls", ())]
    return chunk.replace(text=fields.get("content", ""), reasoning=fields.get("reasoning", ""), tool_calls=calls,
                         finish_reason=finish_reason, sent_ms=int(time.time() * 1000))


def check_reply_subject(subject: str, root: str) -> str:
    """A client's stream subject: a plain subject, and none of kvrelay's own but ``tokens.*`` and
    ``client.<tenant>.*`` (with tenants, the router also checks the tenant is the subject's)."""
    check_subject(subject, "stream_subject")
    if subject.startswith("kvrelay.") and not subject.startswith((f"{root}.tokens.", f"{root}.client.")):
        raise ValueError(f"stream_subject {subject!r} is reserved: use {root}.client.<tenant>.<id>, "
                         f"{root}.tokens.<id> or a subject outside kvrelay.*")
    return subject


def recover_reply_to(data: bytes, root: str) -> tuple[str, str]:
    """(stream_subject, request_id) from a message that failed validation, when they are sound."""
    body = raw_body(data)
    if body is None:
        return "", ""
    subject, rid = body.get("stream_subject"), body.get("request_id")
    try:
        check_reply_subject(subject, root)  # type: ignore[arg-type]
    except ValueError:
        return "", ""
    return subject, rid if isinstance(rid, str) and len(rid) <= MAX_ID_LEN else ""


def _arrival_ms(msg: Delivery) -> int:
    """When the client published (the stream's timestamp), else now."""
    stamp = msg.timestamp_ms()
    return int(time.time() * 1000) if stamp is None else stamp
