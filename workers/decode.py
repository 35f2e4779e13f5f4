"""The decode worker service: the bus edges around a ``DecodeEngine``.

    pull PrefillDone from the "prefilled" work queue (shared consumer + own affinity consumer),
    only while a slot is free  ->  engine.stream(done)
    first delta: ack the message, LeaseRelease to kv.release.<prefill worker> (the KV is in)
    every delta: TokenChunk seq 1, 2, ... on the request's stream subject; the last one carries
    finish_reason and usage
    anyone --Cancel (cancel.<request>)--> engine.abort
    router --PrefillTask (local.<worker>)--> a whole request run here (workers/local_prefill.py)

Bounds: at most ``max_slots`` requests run, and pull requests never ask for more messages than
free slots (``DecodeSlots``, shared with local prefills); messages that arrive beyond that, or
while ``max_slots`` requests run, are nak'ed back to the queue. Until the first delta the message
is kept alive with ``in_progress``; a worker stopping before then naks it so another decode worker
takes the request (the KV lease is still held for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from kvrelay.base.ids import remaining_s
from kvrelay.base.logs import bound, get_logger
from kvrelay.schemas.codec import unpack
from kvrelay.schemas.messages import LeaseRelease, PrefillDone, Usage
from kvrelay.transport.bus import Bus
from kvrelay.transport.subjects import check_subject, check_token
from kvrelay.workers import metrics as m
from kvrelay.workers.config import WorkerProcessConfig
from kvrelay.workers.engine import DecodeEngine, TokenDelta
from kvrelay.workers.errors import EngineError
from kvrelay.workers.lifecycle import WorkerService
from kvrelay.workers.local_prefill import LocalPrefills
from kvrelay.workers.pull import (
    AFFINITY_INACTIVE_S,
    FETCH_ERRORS,
    DecodeSlots,
    affinity_durable,
    consumer_config,
    fetch_promptly,
    pull_consumer,
    settle,
)
from kvrelay.workers.service import (
    RecentIds,
    cancel_key,
    Stream,
    emit,
    engine_failed,
    error_chunk,
    run_worker,
    token_chunk,
    worker_id,
)

log = get_logger(__name__)


@dataclass(kw_only=True)
class Active(Stream):
    """A request pulled from the work queue, from its message to its last chunk."""

    done: PrefillDone
    msg: Msg
    pulled_at: float
    started: bool = False  # the first delta came: the KV is in
    settled: bool = False  # acked, termed or nak'ed
    released: bool = False  # LeaseRelease sent (or deliberately not: nak'ed for another worker)

    @classmethod
    def pulled(cls, done: PrefillDone, msg: Msg) -> Active:  # the prefill worker sent seq 0
        return cls(done=done, msg=msg, pulled_at=time.monotonic(), request_id=done.request_id,
                   subject=done.stream_subject, tenant=done.tenant, deadline_ms=done.deadline_ms,
                   prompt_tokens=len(done.prompt_token_ids), cached_tokens=done.cached_tokens,
                   seq=1, completion_tokens=1)


class DecodeService(WorkerService):
    """One decode worker's state and bus handlers. ``start()``, then ``shutdown()``."""

    role = "decode"
    capacity_key = "max_slots"

    def __init__(self, cfg: WorkerProcessConfig, engine: DecodeEngine, bus: Bus, wid: str) -> None:
        super().__init__(cfg.decode, engine, bus, wid, cfg.decode.max_slots)
        self.slots = DecodeSlots(self.cfg.max_slots)
        self.active: dict[str, Stream] = {}  # pulled requests (Active) and local prefills
        self.local = LocalPrefills(self)
        self.cancelled = RecentIds(4096)  # cancels seen; a PrefillDone pulled later is dropped
        self._pullers: set[asyncio.Task[Any]] = set()
        self._kv_bytes_seen = 0

    # --- lifecycle ------------------------------------------------------------------------------
    async def _open(self) -> list[Any]:
        s, c = self.subjects, self.cfg
        shared = await pull_consumer(self.bus, consumer_config(c, s.consumer_decode, s.prefilled, None))
        own = await pull_consumer(self.bus, consumer_config(
            c, affinity_durable(self.id), s.prefilled_for(self.id), AFFINITY_INACTIVE_S))
        subs = [shared, own, await self.bus.subscribe(s.local_prefill(self.id), self.local.on_task)]
        self._pullers = {
            self.owner.spawn(self._pull_loop(shared, c.fetch_batch), "pull-shared"),
            self.owner.spawn(self._pull_loop(own, 1), "pull-own"),
        }
        return subs

    def _stop_taking(self) -> None:
        self.slots.freed.set()  # a pull loop holding a message for a slot gives it back now

    async def _drain(self) -> None:
        """Stop pulling, then let running requests finish (bounded by ``drain_timeout_s``)."""
        await self.owner.wait(self._pullers, self.cfg.fetch_timeout_s + self.bus.cfg.request_timeout_s)
        running = {a.task for a in self.active.values() if a.task is not None}
        await self.owner.wait(running, self.cfg.drain_timeout_s)

    # --- pulling --------------------------------------------------------------------------------
    async def _pull_loop(self, sub: Any, most: int) -> None:
        """Reserve free slots, fetch at most that many messages, start one request per message."""
        c = self.cfg
        while not self.draining:
            n = await self.slots.acquire(min(most, c.fetch_batch), c.fetch_timeout_s)
            if n == 0:
                continue
            kept, failed = 0, False
            try:
                try:
                    msgs = await fetch_promptly(sub, n, c.fetch_timeout_s)
                except asyncio.TimeoutError:  # nothing to do
                    msgs = []
                except FETCH_ERRORS as exc:
                    log.warning("fetch_failed", error=repr(exc))
                    msgs, failed = [], True
                for msg in msgs:
                    if kept < n and not self.draining and await self._room(msg):
                        kept += await self._take(msg)
                    else:  # a late delivery beyond the reservation, or draining: back to the queue
                        m.DECODE_REQUESTS.labels("returned").inc()
                        await settle(msg, "nak")
            finally:
                self.slots.release(n - kept)
            if failed:  # bus trouble: back off one fetch period instead of spinning
                await asyncio.sleep(c.fetch_timeout_s)

    async def _room(self, msg: Msg) -> bool:
        """Whether a message within its reservation may start now or after a short hold.

        Its slot was reserved, but local prefills may have borrowed every slot (``DecodeSlots``);
        the borrows are repaid as requests end, so the message is held (kept alive with
        ``in_progress``) until one ends, for at most half its ack wait, or until draining. False
        (give it back): the hold ran out or the worker is stopping."""
        c, slots = self.cfg, self.slots
        limit = time.monotonic() + c.ack_wait_s / 2
        while len(self.active) >= c.max_slots:
            left = limit - time.monotonic()
            if left <= 0 or self.draining:
                return False
            slots.freed.clear()
            await settle(msg, "in_progress")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(slots.freed.wait(), min(left, c.ack_wait_s / 6))
        return not self.draining

    async def _take(self, msg: Msg) -> int:
        """Start a request for ``msg`` (1: it holds a slot now) or settle it at once (0)."""
        try:
            done = unpack(msg.data, PrefillDone)
            check_subject(done.stream_subject, "stream_subject")
            check_token(done.prefill_worker, "prefill_worker")
        except ValueError as exc:
            m.DECODE_REQUESTS.labels("undecodable").inc()
            log.warning("bad_prefill_done", error=str(exc)[:300])
            await settle(msg, "term")
            return 0
        rid = done.request_id
        if rid in self.active:  # redelivered while we still work on it
            m.DECODE_REQUESTS.labels("duplicate").inc()
            await settle(msg, "term")
            return 0
        act = Active.pulled(done, msg)
        left = remaining_s(done.deadline_ms)
        cancelled = cancel_key(done.tenant, rid) in self.cancelled
        if cancelled or (left is not None and left <= 0):
            with bound(request_id=rid):
                act.settled = True
                await settle(msg, "term")
                if cancelled:
                    await self.end_error(act, "cancelled", "request cancelled", 499, "abort")
                else:
                    await self.end_error(act, "timeout", "deadline passed before decode started", 504)
                await self._release(act, "dropped")
            m.DECODE_REQUESTS.labels("cancelled" if cancelled else "timeout").inc()
            return 0
        self._start(act, self._request(act), f"req-{rid}")
        return 1

    # --- one pulled request ----------------------------------------------------------------------
    async def _request(self, act: Active) -> None:
        outcome = "error"
        with bound(request_id=act.request_id):
            try:
                outcome = await self.drive(act, self._stream(act), "decode",
                                           "decode did not finish before the deadline")
            except asyncio.CancelledError:
                outcome = await self._stopped(act)
                raise
            finally:
                await self._finish(act, outcome)

    async def _stream(self, act: Active) -> str:
        """Run the engine and stream its deltas; returns the finish reason."""
        agen = self.engine.stream(act.done)
        try:
            delta = await self._first_delta(agen, act)
            act.started = True
            m.DECODE_TIME_TO_KV.observe(time.monotonic() - act.pulled_at)
            if delta is not None and delta.kv_recomputed:
                m.DECODE_KV_RECOMPUTED.inc()
            self._fold_kv_bytes()  # the import is done: count its bytes now, not at the next heartbeat
            act.settled = True
            await settle(act.msg, "ack")
            await self._release(act, "loaded")
            last = time.monotonic()
            while delta is not None:
                if await self.publish(act, delta):
                    return delta.finish_reason or "stop"
                delta = await _next(agen)
                now = time.monotonic()
                m.DECODE_INTER_TOKEN.observe(now - last)
                last = now
            return await self.unfinished(act)
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception as exc:  # noqa: BLE001 - closing a failed stream
                    log.warning("decode_stream_close_failed", error=repr(exc))

    async def _first_delta(self, agen: Any, act: Active) -> TokenDelta | None:
        """The first delta (KV import happens before it); keeps the message alive meanwhile."""
        nxt = asyncio.ensure_future(_next(agen))
        try:
            while True:
                finished, _ = await asyncio.wait({nxt}, timeout=self.cfg.ack_wait_s / 3)
                if finished:
                    return nxt.result()
                await settle(act.msg, "in_progress")
        finally:
            if not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)

    async def _stopped(self, act: Active) -> str:
        """The worker stops under this request: before the KV is in, hand it to another worker."""
        if not act.started and not act.settled:
            act.settled = act.released = True  # the next decode worker needs the lease
            await settle(act.msg, "nak")
            return "returned"
        return await self.stopped(act)

    async def _finish(self, act: Active, outcome: str) -> None:
        if not act.settled:
            act.settled = True
            await settle(act.msg, "term")
        await self._release(act, "done" if outcome in ("stop", "length") else outcome)
        self._end(act, outcome)
        self.slots.release()

    async def _release(self, act: Active, reason: str) -> None:
        """Tell the prefill worker it may free the KV: exactly once per request."""
        if act.released:
            return
        act.released = True
        d = act.done
        rel = LeaseRelease(request_id=d.request_id, ticket=d.kv.ticket, reason=reason[:64])
        await emit(self.bus, self.subjects.kv_release(d.prefill_worker), rel, "release")

    # --- any request: pulled, or a local prefill (workers/local_prefill.py) ------------------------
    def knows(self, request_id: str, tenant: str) -> bool:
        """Whether ``request_id`` runs here or was cancelled."""
        return request_id in self.active or cancel_key(tenant, request_id) in self.cancelled

    def admit_local(self, act: Stream, run: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Take a slot for a local prefill (borrowing one a pull holds in reserve: ``DecodeSlots``)
        and start ``run()``, its runner; False when ``max_slots`` requests run already."""
        if not self.slots.take_local(len(self.active)):
            return False
        self._start(act, run(), f"local-{act.request_id}")
        return True

    def end_local(self, act: Stream, outcome: str) -> None:
        """A local prefill ended with ``outcome``: its slot (or borrow) is given back."""
        self._end(act, outcome)
        self.slots.give_local()

    async def drive(self, act: Stream, body: Coroutine[Any, Any, str], what: str, late: str) -> str:
        """Await ``body`` (streaming; returns the finish reason) until the request's deadline; a
        timeout (``late``: its message) or an engine failure ends the stream. Returns the outcome."""
        try:
            return await asyncio.wait_for(body, remaining_s(act.deadline_ms))
        except asyncio.TimeoutError:
            await self.abort(act.request_id)
            await self.end_error(act, "timeout", late, 504)
            return "timeout"
        except Exception as exc:  # noqa: BLE001 - an engine failure ends this request only
            end = functools.partial(self.end_error, act)
            return await engine_failed(exc, act.cancelled, what, end, self.dead)

    async def stopped(self, act: Stream) -> str:
        """The worker stops under a running request: abort it and end its stream ("draining")."""
        await self.abort(act.request_id)
        await self.end_error(act, "draining", "decode worker shut down", 503)
        return "draining"

    async def publish(self, act: Stream, delta: TokenDelta) -> bool:
        """One delta as one chunk; True when it was the last (it carries the usage)."""
        act.completion_tokens += len(delta.token_ids)
        m.DECODE_TOKENS.inc(len(delta.token_ids))
        usage = None
        if delta.finish_reason:
            usage = Usage(prompt_tokens=act.prompt_tokens, completion_tokens=act.completion_tokens,
                          cached_tokens=act.cached_tokens)
            act.ended = True
        chunk = token_chunk(act.request_id, act.seq, self.id, delta.token_ids, delta.text,
                            delta.finish_reason, usage)
        act.seq += 1
        await emit(self.bus, act.subject, chunk, "token")
        return act.ended

    async def unfinished(self, act: Stream) -> str:
        """The engine's stream ended without a finish reason: "cancelled" when the client cancelled
        (the stream ends with "abort"); else an ``EngineError``."""
        if act.cancelled:
            await self.end_error(act, "cancelled", "request cancelled", 499, "abort")
            return "cancelled"
        raise EngineError("the engine's token stream ended without a finish reason")

    async def end_error(self, act: Stream, code: str, message: str, status: int, finish: Any = "error") -> None:
        """End the stream with an error chunk, unless its final chunk went out already."""
        if act.ended:
            return
        act.ended = True
        chunk = error_chunk(act.request_id, act.seq, self.id, code, message, status, finish)
        act.seq += 1
        await emit(self.bus, act.subject, chunk, "error")

    def _start(self, act: Stream, run: Coroutine[Any, Any, None], name: str) -> None:
        self.active[act.request_id] = act
        self._gauges()
        act.task = self.owner.spawn(run, name)

    def _end(self, act: Stream, outcome: str) -> None:
        self.active.pop(act.request_id, None)
        self._gauges()
        m.DECODE_REQUESTS.labels(outcome).inc()

    # --- cancellation and reporting --------------------------------------------------------------
    async def _cancel(self, rid: str, tenant: str) -> None:
        self.cancelled.add(cancel_key(tenant, rid))
        act = self.active.get(rid)
        if act is not None and act.tenant == tenant and not act.cancelled:
            act.cancelled = True
            await self.abort(rid)

    def _fold_kv_bytes(self) -> Any:
        """Add the engine's KV bytes moved since the last fold to the metric; returns the stats."""
        stats = self.engine.stats()
        if stats.kv_bytes_moved > self._kv_bytes_seen:
            m.KV_BYTES_MOVED.inc(stats.kv_bytes_moved - self._kv_bytes_seen)
            self._kv_bytes_seen = stats.kv_bytes_moved
        return stats

    def _load(self) -> dict[str, Any]:  # local prefills add queued_tokens and local_budget_tokens
        return self.local.load(active=len(self.active), free_kv_blocks=self._fold_kv_bytes().free_kv_blocks)

    def _gauges(self) -> None:
        m.DECODE_ACTIVE.set(len(self.active))


async def _next(agen: Any) -> TokenDelta | None:
    """The next delta, or None at the end of the stream."""
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None


async def serve(cfg: WorkerProcessConfig, stop: asyncio.Event, engine: DecodeEngine | None = None) -> None:
    """Run a decode worker until ``stop`` is set; raises ``EngineDead`` if the engine dies."""
    wid = worker_id(cfg.decode.worker_id)
    if engine is None:
        from kvrelay.workers.factory import decode_engine

        engine = decode_engine(cfg, wid)
    await run_worker("decode", cfg, wid, engine, DecodeService, stop)
