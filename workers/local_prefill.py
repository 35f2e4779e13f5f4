"""Local prefill on a decode worker: the router sends a whole request here (decode affinity).

    router --PrefillTask (core request/reply, kvrelay.<ns>.local.<worker>)--> this worker
    reply at once: DispatchReply accepted, or refused with a code:
        overloaded   ``decode.max_slots`` requests run already (``DecodeSlots.take_local``)
        draining     the worker is stopping
        invalid      undecodable task, bad stream subject, or a request id already here
        timeout      the deadline passed already
        unsupported  the engine has no ``stream_local`` (``workers.engine.LocalPrefillEngine``)
    accepted -> engine.stream_local(task): the engine computes the prompt (its prefix cache makes
    the blocks it holds free: no KV transfer, no lease) and streams every token as
    TokenChunk seq 0, 1, ... on the task's stream subject, like a prefill + decode would.

A refused task is the router's to place elsewhere (it takes the normal prefill path). An accepted
one ends with exactly one final chunk: the finish reason, or an error (``timeout`` 504 at the
deadline, ``engine`` 500, ``draining`` 503 when the worker stops under it, ``abort`` on Cancel).

Metrics: ``kvrelay_decode_local_prefill_total{outcome}`` (accepted, the refusal codes, then the
finish: stop, length, cancelled, timeout, engine_error, draining) and
``kvrelay_decode_local_prompt_tokens_total{source}`` (computed here / cached here).
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from prometheus_client import Counter

from kvrelay.base.ids import now_ms, remaining_s
from kvrelay.base.logs import bound, get_logger
from kvrelay.schemas.codec import unpack
from kvrelay.schemas.messages import DispatchReply, PrefillTask, Usage
from kvrelay.transport.errors import TransportError
from kvrelay.transport.subjects import check_subject, check_token
from kvrelay.workers import metrics as m
from kvrelay.workers.engine import TokenDelta
from kvrelay.workers.errors import EngineError
from kvrelay.workers.service import emit, engine_failed, error_chunk, token_chunk

if TYPE_CHECKING:
    from kvrelay.workers.decode import DecodeService

log = get_logger(__name__)

LOCAL_PREFILLS = Counter("kvrelay_decode_local_prefill_total",
                         "Local prefill tasks on decode workers, by outcome (accepted, refusals, finishes)",
                         ["outcome"])
LOCAL_PROMPT_TOKENS = Counter("kvrelay_decode_local_prompt_tokens_total",
                              "Prompt tokens of local prefills: computed on the decode worker or cached",
                              ["source"])


@dataclass
class LocalActive:
    """One local prefill in the decode service's ``active`` map (next to pulled requests)."""

    job: PrefillTask
    started_at: float
    task: asyncio.Task[Any] | None = None  # the runner (the service awaits it when stopping)
    seq: int = 0
    generated: int = 0
    cached_tokens: int = 0
    ended: bool = False  # the final chunk went out
    cancelled: bool = False

    @property
    def request_id(self) -> str:
        return self.job.request_id


class LocalPrefills:
    """The ``local.<worker>`` handler and runner of one ``DecodeService``."""

    def __init__(self, svc: DecodeService) -> None:
        self.svc = svc

    async def on_task(self, msg: Msg) -> None:
        reply = self._admit(msg)
        LOCAL_PREFILLS.labels("accepted" if reply.accepted else reply.code).inc()
        try:
            await self.svc.bus.respond(msg, reply)
        except (TransportError, ValueError) as exc:  # the router falls back after its timeout
            log.warning("local_reply_failed", error=repr(exc))

    def _admit(self, msg: Msg) -> DispatchReply:
        """Decide and, when accepted, start the request (synchronously: no await in between)."""
        svc = self.svc
        try:
            task = unpack(msg.data, PrefillTask)
            check_subject(task.stream_subject, "stream_subject")
            check_token(task.request_id, "request_id")
        except ValueError as exc:
            return _refuse("invalid", f"bad local prefill task: {str(exc)[:300]}")
        run = getattr(svc.engine, "stream_local", None)
        if run is None:
            return _refuse("unsupported", "this decode engine cannot prefill locally")
        if svc.draining:
            return _refuse("draining", "the decode worker is stopping")
        rid = task.request_id
        if rid in svc.active or rid in svc.cancelled:
            return _refuse("invalid", f"request {rid!r} is already here or was cancelled")
        left = remaining_s(task.deadline_ms)
        if left is not None and left <= 0:
            return _refuse("timeout", "the deadline passed before the local prefill started")
        if task.accept_by_ms and task.accept_by_ms < now_ms():
            return _refuse("timeout", "the offer expired (the router stopped waiting for this reply)")
        if len(task.prompt_token_ids) + task.sampling.max_tokens > svc.engine.info.max_model_len:
            return _refuse("invalid", "prompt plus max_tokens exceed this engine's context")
        if not svc.slots.take_local(len(svc.active)):
            return _refuse("overloaded", f"all {svc.cfg.max_slots} decode slots are in use")
        act = LocalActive(task, time.monotonic())
        svc.active[rid] = act  # type: ignore[assignment]
        m.DECODE_ACTIVE.set(len(svc.active))
        act.task = svc.owner.spawn(self._run(act), f"local-{rid}")
        return DispatchReply(accepted=True)

    async def _run(self, act: LocalActive) -> None:
        svc, rid = self.svc, act.request_id
        outcome = "error"
        with bound(request_id=rid):
            try:
                outcome = await asyncio.wait_for(self._stream(act), remaining_s(act.job.deadline_ms))
            except asyncio.TimeoutError:
                outcome = "timeout"
                await svc._abort(rid)
                await self._end_error(act, "timeout", "the local prefill did not finish before the deadline",
                                      504)
            except asyncio.CancelledError:
                outcome = "draining"
                await svc._abort(rid)
                await self._end_error(act, "draining", "decode worker shut down", 503)
                raise
            except Exception as exc:  # noqa: BLE001 - an engine failure ends this request only
                end = functools.partial(self._end_error, act)
                outcome = await engine_failed(exc, act.cancelled, "local prefill", end, svc.dead)
            finally:
                svc.active.pop(rid, None)
                svc.slots.give_local()
                m.DECODE_ACTIVE.set(len(svc.active))
                m.DECODE_REQUESTS.labels(outcome).inc()
                LOCAL_PREFILLS.labels(outcome).inc()

    async def _stream(self, act: LocalActive) -> str:
        """Run the engine and stream its deltas from seq 0; returns the finish reason."""
        agen = self.svc.engine.stream_local(act.job)  # type: ignore[attr-defined]
        try:
            first, last = True, time.monotonic()
            async for delta in agen:
                now = time.monotonic()
                if first:
                    first = False
                    self._first(act, delta)
                else:
                    m.DECODE_INTER_TOKEN.observe(now - last)
                last = now
                if await self._publish(act, delta):
                    return delta.finish_reason or "stop"
            if act.cancelled:
                await self._end_error(act, "cancelled", "request cancelled", 499, "abort")
                return "cancelled"
            raise EngineError("the engine's token stream ended without a finish reason")
        finally:
            try:
                await agen.aclose()
            except Exception as exc:  # noqa: BLE001 - closing a failed stream
                log.warning("local_stream_close_failed", error=repr(exc))

    def _first(self, act: LocalActive, delta: TokenDelta) -> None:
        prompt = len(act.job.prompt_token_ids)
        act.cached_tokens = min(delta.cached_tokens, prompt)
        LOCAL_PROMPT_TOKENS.labels("cached").inc(act.cached_tokens)
        LOCAL_PROMPT_TOKENS.labels("computed").inc(prompt - act.cached_tokens)
        m.DECODE_TIME_TO_KV.observe(time.monotonic() - act.started_at)
        log.info("local_prefill", prompt_tokens=prompt, cached_tokens=act.cached_tokens)

    async def _publish(self, act: LocalActive, delta: TokenDelta) -> bool:
        """One delta as one chunk; True when it was the last."""
        act.generated += len(delta.token_ids)
        m.DECODE_TOKENS.inc(len(delta.token_ids))
        usage = None
        if delta.finish_reason:
            usage = Usage(prompt_tokens=len(act.job.prompt_token_ids), completion_tokens=act.generated,
                          cached_tokens=act.cached_tokens)
            act.ended = True
        chunk = token_chunk(act.request_id, act.seq, self.svc.id, delta.token_ids, delta.text,
                            delta.finish_reason, usage)
        act.seq += 1
        await emit(self.svc.bus, act.job.stream_subject, chunk, "token")
        return act.ended

    async def _end_error(self, act: LocalActive, code: str, message: str, status: int,
                         finish: Any = "error") -> None:
        if act.ended:
            return
        act.ended = True
        chunk = error_chunk(act.request_id, act.seq, self.svc.id, code, message, status, finish)
        act.seq += 1
        await emit(self.svc.bus, act.job.stream_subject, chunk, "error")


def _refuse(code: str, reason: str) -> DispatchReply:
    return DispatchReply(accepted=False, code=code, reason=reason[:512])
