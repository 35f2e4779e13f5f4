"""The prefill worker service: the bus edges around a ``PrefillEngine``.

    router --PrefillTask (request/reply on prefill.<id>)--> accept into a bounded queue, reply at once
    runner: engine.prefill -> TokenChunk seq 0 on the task's stream subject (time to first token)
            -> PrefillDone on the work queue "prefilled" (or "prefilled.<decode hint>")
    decode worker --LeaseRelease (kv.release.<id>)--> engine.release(ticket)
    anyone --Cancel (cancel.<request>)--> drop a queued task / abort a running one

Bounds: ``max_queued`` tasks and ``max_queued_tokens`` tokens queued, ``max_running`` in the
engine, and no task accepted without room for its KV in the export region; past a bound the
dispatch is rejected with code "overloaded" (the router tries another worker). A full work queue
ends the request with an "overloaded" (429) error chunk and frees its KV at once. Queued tasks
start shortest first, aged and never passed over more than ``max_overtakes`` times
(``prefill.schedule``, ``workers/prefill_queue.py``): a short prompt does not wait behind long ones.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from kvrelay.base.ids import now_ms, remaining_s
from kvrelay.base.logs import bound, get_logger
from kvrelay.schemas.codec import unpack
from kvrelay.schemas.messages import (
    DispatchReply,
    LeaseRelease,
    PrefillDone,
    PrefillTask,
    Usage,
)
from kvrelay.transport.bus import Bus
from kvrelay.transport.errors import Backpressure, BusTimeout, TransportError
from kvrelay.transport.subjects import check_subject, check_token
from kvrelay.workers import metrics as m
from kvrelay.workers.config import WorkerProcessConfig
from kvrelay.workers.engine import PrefillEngine, PrefillOutput
from kvrelay.workers.errors import EngineDead, ExportFull
from kvrelay.workers.lifecycle import WorkerService
from kvrelay.workers.prefill_queue import PrefillQueue, Queued, schedule_of
from kvrelay.workers.service import (
    emit,
    error_chunk,
    run_worker,
    token_chunk,
    worker_id,
)

log = get_logger(__name__)


@dataclass
class Running:
    item: Queued
    cancelled: bool = False


class PrefillService(WorkerService):
    """One prefill worker's state and bus handlers. ``start()``, then ``shutdown()``."""

    role = "prefill"
    capacity_key = "max_running"

    def __init__(self, cfg: WorkerProcessConfig, engine: PrefillEngine, bus: Bus, wid: str) -> None:
        super().__init__(cfg.prefill, engine, bus, wid, cfg.prefill.max_running)
        self.queue = PrefillQueue(self.cfg.max_queued, self.cfg.max_queued_tokens, engine.info.block_size,
                                  engine.info.max_model_len, schedule_of(self.cfg))
        self.running: dict[str, Running] = {}
        self._work = asyncio.Event()  # set while the queue may hold tasks
        self._changed = asyncio.Event()  # set on every task end / lease change (drain waits on it)

    # --- lifecycle ------------------------------------------------------------------------------
    async def _open(self) -> list[Any]:
        s = self.subjects
        subs = [
            await self.bus.subscribe(s.prefill(self.id), self.on_task),
            await self.bus.subscribe(s.kv_release(self.id), self.on_release),
        ]
        for i in range(self.cfg.max_running):
            self.owner.spawn(self._runner(), f"runner-{i}")
        self.owner.spawn(self._lease_loop(), "leases")
        return subs

    async def _drain(self) -> None:
        """Until idle (no task queued or running, no KV held) or ``drain_timeout_s``; tasks still
        queued then end with a "draining" error."""
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while not self._idle() and not self.dead.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, self.cfg.lease_check_s))
            except asyncio.TimeoutError:
                pass
        for item in self.queue.drain():
            await self._fail(item.task, 0, "draining", "worker shut down before the task ran", 503)

    def _idle(self) -> bool:
        return not self.queue and not self.running and self.engine.stats().exported_blocks == 0

    # --- dispatch -------------------------------------------------------------------------------
    async def on_task(self, msg: Msg) -> None:
        """Answer a dispatch at once: accepted (queued) or rejected with a code."""
        try:
            task = unpack(msg.data, PrefillTask)
            check_subject(task.stream_subject, "stream_subject")
            if task.decode_hint:
                check_token(task.decode_hint, "decode_hint")
        except ValueError as exc:
            reply = DispatchReply(accepted=False, code="invalid", reason=str(exc)[:512])
            await self._reply(msg, reply, "invalid")
            return
        rid = task.request_id
        if rid in self.queue or rid in self.running:
            await self._reply(msg, DispatchReply(accepted=True, reason="duplicate",
                                                 queued_tokens=self.queue.tokens), "duplicate")
            return
        committed = sum(r.item.blocks for r in self.running.values())
        free = self.engine.stats().export_free_blocks
        rej = self.queue.check(task, now_ms(), self.draining, free, committed)
        if rej is not None:
            with bound(request_id=rid):
                log.info("prefill_rejected", code=rej.code, reason=rej.reason)
            await self._reply(msg, DispatchReply(accepted=False, code=rej.code, reason=rej.reason,
                                                 queued_tokens=self.queue.tokens), rej.code)
            return
        self.queue.push(task)
        self._gauges()
        await self._reply(msg, DispatchReply(accepted=True, queued_tokens=self.queue.tokens), "accepted")
        self._work.set()  # after the reply: the router hears back before the engine is involved

    async def _reply(self, msg: Msg, reply: DispatchReply, outcome: str) -> None:
        m.PREFILL_REQUESTS.labels(outcome).inc()
        try:
            await self.bus.respond(msg, reply)
        except TransportError as exc:
            log.warning("dispatch_reply_failed", error=repr(exc))

    # --- running tasks --------------------------------------------------------------------------
    async def _runner(self) -> None:
        while True:
            item = self.queue.pop()
            if item is None:
                self._work.clear()
                await self._work.wait()
                continue
            self._gauges()
            try:
                await self._run(item)
            except Exception:  # noqa: BLE001 - a bug in one request must not stop this runner
                log.exception("prefill_runner_error", request_id=item.task.request_id)

    async def _run(self, item: Queued) -> None:
        task = item.task
        with bound(request_id=task.request_id):
            m.PREFILL_QUEUE_SECONDS.observe(time.monotonic() - item.queued_at)
            left = remaining_s(task.deadline_ms)
            if left is not None and left <= 0:
                await self._fail(task, 0, "timeout", "deadline passed before the prefill started", 504,
                                 "expired")
                return
            run = Running(item)
            self.running[task.request_id] = run
            self._gauges()
            try:
                out = await self._prefill(task, run, left)
            finally:
                self.running.pop(task.request_id, None)
                self._changed.set()
                self._gauges()
            if out is not None:
                await self._finish(task, run, out)

    async def _prefill(self, task: PrefillTask, run: Running, left: float | None) -> PrefillOutput | None:
        """The engine call, with the deadline; failures end the stream here (returns None)."""
        rid = task.request_id
        t0 = time.monotonic()
        try:
            out = await asyncio.wait_for(self.engine.prefill(task), left)
        except asyncio.TimeoutError:
            await self.abort(rid)
            await self._fail(task, 0, "timeout", "prefill did not finish before the deadline", 504)
            return None
        except asyncio.CancelledError:  # shutdown: abort in the engine, tell the client, re-raise
            await self.abort(rid)
            await self._fail(task, 0, "draining", "worker shut down during the prefill", 503)
            raise
        except (ExportFull, Backpressure) as exc:
            await self._fail(task, 0, "overloaded", f"no room to hold the KV: {exc}", 429)
            return None
        except Exception as exc:  # noqa: BLE001 - any engine failure ends this request only
            if run.cancelled:
                await self._cancelled(task, 0)
                return None
            log.exception("prefill_failed")
            await self._fail(task, 0, "engine", f"prefill failed: {exc!r}", 500, "engine_error")
            if isinstance(exc, EngineDead):
                self.dead.set()
            return None
        m.PREFILL_SECONDS.observe(time.monotonic() - t0)
        return out

    async def _finish(self, task: PrefillTask, run: Running, out: PrefillOutput) -> None:
        """First token out now; then hand the KV to decode through the work queue."""
        rid, stream = task.request_id, task.stream_subject
        if run.cancelled:
            self._release_kv(out)
            await self._cancelled(task, 0)
            return
        if out.finish_reason is not None:
            self._release_kv(out)  # nothing to decode: no KV should be held (engine contract)
            usage = Usage(prompt_tokens=len(task.prompt_token_ids), completion_tokens=1,
                          cached_tokens=out.cached_tokens)
            chunk = token_chunk(rid, 0, self.id, [out.first_token_id], out.text, out.finish_reason, usage)
            await emit(self.bus, stream, chunk, "token")
            m.PREFILL_REQUESTS.labels("finished").inc()
            return
        if out.kv is None:
            await self._fail(task, 0, "engine", "engine returned no KV for an unfinished prefill", 500,
                             "engine_error")
            return
        await emit(self.bus, stream, token_chunk(rid, 0, self.id, [out.first_token_id], out.text), "token")
        done = PrefillDone(
            request_id=rid, tenant=task.tenant, prompt_token_ids=task.prompt_token_ids,
            first_token_id=out.first_token_id, sampling=task.sampling, stream_subject=stream,
            deadline_ms=task.deadline_ms, prefill_worker=self.id, kv=out.kv, prefill_ms=out.prefill_ms,
            cached_tokens=out.cached_tokens, decode_hint=task.decode_hint, session=task.session,
            kv_ttl_ms=task.kv_ttl_ms,
        )
        await self._hand_over(task, done)

    async def _hand_over(self, task: PrefillTask, done: PrefillDone) -> None:
        s = self.subjects
        subject = s.prefilled_for(task.decode_hint) if task.decode_hint else s.prefilled
        msg_id = f"{task.request_id}.{done.kv.ticket}"  # a retry after a lost ack is deduplicated
        try:
            try:
                await self.bus.js_publish(subject, done, msg_id=msg_id)
            except BusTimeout:
                await self.bus.js_publish(subject, done, msg_id=msg_id)
        except Backpressure as exc:
            self.engine.release(done.kv.ticket)
            await self._fail(task, 1, "overloaded", f"decode work queue is full: {exc}", 429, "backpressure")
            return
        except TransportError as exc:
            self.engine.release(done.kv.ticket)
            await self._fail(task, 1, "unavailable", f"cannot hand the KV to decode: {exc}", 503,
                             "publish_failed")
            return
        m.PREFILL_REQUESTS.labels("done").inc()
        log.debug("prefill_done", ticket=done.kv.ticket, subject=subject)

    def _release_kv(self, out: PrefillOutput) -> None:
        if out.kv is not None:
            self.engine.release(out.kv.ticket)
            self._changed.set()

    async def _fail(self, task: PrefillTask, seq: int, code: str, message: str, status: int,
                    outcome: str | None = None) -> None:
        m.PREFILL_REQUESTS.labels(outcome or code).inc()
        log.info("prefill_failed_request", code=code, reason=message)
        chunk = error_chunk(task.request_id, seq, self.id, code, message, status)
        await emit(self.bus, task.stream_subject, chunk, "error")

    async def _cancelled(self, task: PrefillTask, seq: int) -> None:
        m.PREFILL_REQUESTS.labels("cancelled").inc()
        chunk = error_chunk(task.request_id, seq, self.id, "cancelled", "request cancelled", 499, "abort")
        await emit(self.bus, task.stream_subject, chunk, "error")

    # --- leases and cancellation ----------------------------------------------------------------
    async def on_release(self, msg: Msg) -> None:
        try:
            rel = unpack(msg.data, LeaseRelease)
        except ValueError as exc:
            log.warning("bad_lease_release", error=str(exc))
            return
        if self.engine.release(rel.ticket):
            m.LEASES_RELEASED.inc()
        self._changed.set()

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.lease_check_s)
            n = self.engine.expire_leases(now_ms())
            if n:
                m.LEASES_EXPIRED.inc(n)
                log.info("leases_expired", count=n)
                self._changed.set()

    async def _cancel(self, rid: str, tenant: str) -> None:
        """Drop a queued task (its stream ends "cancelled"), or abort a running one: of ``tenant``."""
        item = self.queue.remove(rid, tenant)
        if item is not None:
            self._gauges()
            self._changed.set()
            await self._cancelled(item.task, 0)
            return
        run = self.running.get(rid)
        if run is not None and run.item.task.tenant == tenant and not run.cancelled:
            run.cancelled = True
            await self.abort(rid)

    # --- reporting ------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        stats = self.engine.stats()
        m.EXPORT_FREE_BLOCKS.set(stats.export_free_blocks)
        return {"active": len(self.running), "queued": len(self.queue), "queued_tokens": self.queue.tokens,
                "free_kv_blocks": stats.export_free_blocks}

    def _gauges(self) -> None:
        m.PREFILL_QUEUE_DEPTH.set(len(self.queue))
        m.PREFILL_QUEUED_TOKENS.set(self.queue.tokens)
        m.PREFILL_RUNNING.set(len(self.running))


async def serve(cfg: WorkerProcessConfig, stop: asyncio.Event, engine: PrefillEngine | None = None) -> None:
    """Run a prefill worker until ``stop`` is set; raises ``EngineDead`` if the engine dies."""
    wid = worker_id(cfg.prefill.worker_id)
    if engine is None:
        from kvrelay.workers.factory import prefill_engine

        engine = prefill_engine(cfg, wid)
    await run_worker("prefill", cfg, wid, engine, PrefillService, stop)

