"""Local prefill on a decode worker: the router sends a whole request here (decode affinity).

    router --PrefillTask (core request/reply, kvrelay.<ns>.local.<worker>)--> this worker
    reply at once: DispatchReply accepted, or refused with a code:
        overloaded   ``decode.max_slots`` requests run already (``DecodeSlots.take_local``), or its
                     prompt does not fit the ITL budget (``workers/local_budget.py``; metric outcome
                     "budget")
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

Metrics: ``kvrelay_decode_local_prefill_total{outcome}`` (accepted, the refusal codes and "budget",
then the finish: stop, length, cancelled, timeout, engine_error, draining) and
``kvrelay_decode_local_prompt_tokens_total{source}`` (computed here / cached here).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from prometheus_client import Counter

from kvrelay.base.ids import now_ms, remaining_s
from kvrelay.base.logs import bound, get_logger
from kvrelay.schemas.codec import unpack
from kvrelay.schemas.messages import DispatchReply, PrefillTask
from kvrelay.transport.errors import TransportError
from kvrelay.transport.subjects import check_subject, check_token
from kvrelay.workers import metrics as m
from kvrelay.workers.engine import TokenDelta
from kvrelay.workers.local_budget import ItlBudget, LocalBudget
from kvrelay.workers.service import Stream

if TYPE_CHECKING:
    from kvrelay.workers.decode import DecodeService

log = get_logger(__name__)

LOCAL_PREFILLS = Counter("kvrelay_decode_local_prefill_total",
                         "Local prefill tasks on decode workers, by outcome (accepted, refusals, finishes)",
                         ["outcome"])
LOCAL_PROMPT_TOKENS = Counter("kvrelay_decode_local_prompt_tokens_total",
                              "Prompt tokens of local prefills: computed on the decode worker or cached",
                              ["source"])


@dataclass(kw_only=True)
class LocalActive(Stream):
    """One local prefill in the decode service's ``active`` map (next to pulled requests)."""

    job: PrefillTask
    started_at: float

    @classmethod
    def of(cls, task: PrefillTask) -> LocalActive:
        return cls(job=task, started_at=time.monotonic(), request_id=task.request_id, tenant=task.tenant,
                   subject=task.stream_subject, deadline_ms=task.deadline_ms,
                   prompt_tokens=len(task.prompt_token_ids))


class LocalPrefills:
    """The ``local.<worker>`` handler and runner of one ``DecodeService``; it uses the service's
    public side only (``knows``, ``admit_local``, ``end_local``, ``drive``, ``stopped``,
    ``publish``, ``unfinished``)."""

    def __init__(self, svc: DecodeService) -> None:
        self.svc = svc
        self.budget = LocalBudget(ItlBudget.from_config(svc.cfg))

    def load(self, **fields: Any) -> dict[str, Any]:
        """The discovery record's load ``fields`` plus the local-prefill tokens in flight and the budget."""
        return fields | {"queued_tokens": self.budget.tokens, "local_budget_tokens": self.budget.limit}

    async def on_task(self, msg: Msg) -> None:
        reply, outcome = self._admit(msg)
        LOCAL_PREFILLS.labels(outcome).inc()
        try:
            await self.svc.bus.respond(msg, reply)
        except (TransportError, ValueError) as exc:  # the router falls back after its timeout
            log.warning("local_reply_failed", error=repr(exc))

    def _admit(self, msg: Msg) -> tuple[DispatchReply, str]:
        """Decide and, when accepted, start the request (synchronously: no await in between); the
        reply and the metric's outcome."""
        svc = self.svc
        try:
            task = unpack(msg.data, PrefillTask)
            check_subject(task.stream_subject, "stream_subject")
            check_token(task.request_id, "request_id")
        except ValueError as exc:
            return _refuse("invalid", f"bad local prefill task: {str(exc)[:300]}")
        why = self._refusal(task)
        if why is not None:
            return why
        rid = task.request_id
        reason = self.budget.admit(rid, task.work_tokens)
        if reason is not None:
            with bound(request_id=rid):
                log.info("local_prefill_refused", code="overloaded", reason=reason)
            return _refuse("overloaded", reason, "budget")
        act = LocalActive.of(task)
        if not svc.admit_local(act, lambda: self._run(act)):
            self.budget.done(rid)
            return _refuse("overloaded", f"all {svc.cfg.max_slots} decode slots are in use")
        return DispatchReply(accepted=True), "accepted"

    def _refusal(self, task: PrefillTask) -> tuple[DispatchReply, str] | None:
        """Why ``task`` cannot run here whatever the load (None: it can)."""
        svc = self.svc
        if getattr(svc.engine, "stream_local", None) is None:
            return _refuse("unsupported", "this decode engine cannot prefill locally")
        if svc.draining:
            return _refuse("draining", "the decode worker is stopping")
        rid = task.request_id
        if svc.knows(rid, task.tenant):
            return _refuse("invalid", f"request {rid!r} is already here or was cancelled")
        left = remaining_s(task.deadline_ms)
        if left is not None and left <= 0:
            return _refuse("timeout", "the deadline passed before the local prefill started")
        if task.accept_by_ms and task.accept_by_ms < now_ms():
            return _refuse("timeout", "the offer expired (the router stopped waiting for this reply)")
        if len(task.prompt_token_ids) + task.sampling.max_tokens > svc.engine.info.max_model_len:
            return _refuse("invalid", "prompt plus max_tokens exceed this engine's context")
        return None

    async def _run(self, act: LocalActive) -> None:
        svc = self.svc
        outcome = "error"
        with bound(request_id=act.request_id):
            try:
                outcome = await svc.drive(act, self._stream(act), "local prefill",
                                          "the local prefill did not finish before the deadline")
            except asyncio.CancelledError:
                outcome = await svc.stopped(act)
                raise
            finally:
                self.budget.done(act.request_id)
                svc.end_local(act, outcome)
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
                if await self.svc.publish(act, delta):
                    return delta.finish_reason or "stop"
            return await self.svc.unfinished(act)
        finally:
            try:
                await agen.aclose()
            except Exception as exc:  # noqa: BLE001 - closing a failed stream
                log.warning("local_stream_close_failed", error=repr(exc))

    def _first(self, act: LocalActive, delta: TokenDelta) -> None:
        self.budget.done(act.request_id)  # the prompt is computed
        act.cached_tokens = min(delta.cached_tokens, act.prompt_tokens)
        LOCAL_PROMPT_TOKENS.labels("cached").inc(act.cached_tokens)
        LOCAL_PROMPT_TOKENS.labels("computed").inc(act.prompt_tokens - act.cached_tokens)
        m.DECODE_TIME_TO_KV.observe(time.monotonic() - act.started_at)
        log.info("local_prefill", prompt_tokens=act.prompt_tokens, cached_tokens=act.cached_tokens)


def _refuse(code: str, reason: str, outcome: str = "") -> tuple[DispatchReply, str]:
    return DispatchReply(accepted=False, code=code, reason=reason[:512]), outcome or code
