"""Pieces the prefill and decode services share: worker ids, bounded id sets, the state of one
outgoing token stream, token-chunk builders, a guarded publish, the heartbeat and ``run_worker``.
The services' common lifecycle is ``workers/lifecycle.py``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kvrelay.base.ids import component_id, now_ms
from kvrelay.base.logs import get_logger
from kvrelay.schemas.codec import Message
from kvrelay.schemas.messages import ErrorInfo, FinishReason, TokenChunk, Usage
from kvrelay.transport.bus import Bus
from kvrelay.transport.discovery import Announcer
from kvrelay.transport.errors import TransportError
from kvrelay.transport.subjects import check_token
from kvrelay.workers import metrics
from kvrelay.workers.errors import EngineDead

log = get_logger(__name__)

def worker_id(configured: str) -> str:
    """The configured id (validated as a subject token), else ``<hostname>-<pid>`` made into one."""
    return check_token(configured, "worker id") if configured else component_id()


class RecentIds:
    """The last ``maxlen`` ids seen (e.g. cancelled requests); when full the oldest is dropped."""

    def __init__(self, maxlen: int = 4096) -> None:
        self.maxlen = maxlen
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, rid: str) -> None:
        self._ids[rid] = None
        self._ids.move_to_end(rid)
        while len(self._ids) > self.maxlen:
            self._ids.popitem(last=False)

    def __contains__(self, rid: object) -> bool:
        return rid in self._ids


@dataclass(kw_only=True)
class Stream:
    """One request's token stream out of a decode worker (a pulled request or a local prefill)."""

    request_id: str
    subject: str  # where its chunks go
    tenant: str = ""  # a Cancel counts only on its own tenant's subject
    deadline_ms: int
    prompt_tokens: int
    cached_tokens: int = 0
    seq: int = 0  # of the next chunk
    completion_tokens: int = 0  # tokens streamed so far, a prefill worker's first token included
    task: asyncio.Task[Any] | None = None  # its runner (the service awaits it when stopping)
    ended: bool = False  # the final chunk went out
    cancelled: bool = False


def cancel_key(tenant: str, request_id: str) -> str:
    """A request as a Cancel names it: the same id may be used by two tenants."""
    return f"{tenant}.{request_id}"


def error_chunk(request_id: str, seq: int, worker: str, code: str, message: str, status: int,
                finish_reason: FinishReason = "error") -> TokenChunk:
    """The chunk that ends a stream on failure (``finish_reason`` "error", or "abort" if cancelled)."""
    return TokenChunk(request_id=request_id, seq=seq, finish_reason=finish_reason, worker=worker,
                      error=ErrorInfo(code=code, message=message[:4096], status=status), sent_ms=now_ms())


def token_chunk(request_id: str, seq: int, worker: str, token_ids: list[int], text: str,
                finish_reason: str | None = None, usage: Usage | None = None) -> TokenChunk:
    fr: Any = finish_reason if finish_reason in ("stop", "length", "abort", "error") else (
        None if finish_reason is None else "stop")
    return TokenChunk(request_id=request_id, seq=seq, token_ids=list(token_ids), text=text,
                      finish_reason=fr, usage=usage if fr else None, worker=worker, sent_ms=now_ms())


async def emit(bus: Bus, subject: str, msg: Message, kind: str) -> bool:
    """Core publish that never raises: a failure is logged and counted (the caller carries on)."""
    try:
        await bus.publish(subject, msg)
        return True
    except (TransportError, ValueError) as exc:
        metrics.BUS_PUBLISH_ERRORS.labels(kind).inc()
        log.warning("publish_failed", subject=subject, kind=kind, error=repr(exc))
        return False


async def wait_any(*events: asyncio.Event) -> None:
    """Until one of ``events`` is set (the service's lifetime: ``stop`` or an internal failure)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


async def heartbeat(announcer: Announcer, retry_s: float) -> None:
    """``announcer.run()`` for the worker's lifetime (until ``announcer.stop()`` or a cancel): a bus
    failure (e.g. the bucket cannot be opened yet) is logged and retried after ``retry_s``."""
    while not announcer.stopped:
        try:
            await announcer.run()
        except TransportError as exc:
            log.warning("heartbeat_failed", error=repr(exc))
            await asyncio.sleep(retry_s)


def attach_bus(engine: Any, bus: Bus, wid: str) -> None:
    """Give the engine the bus and the worker id if it wants them (``attach_bus``, optional:
    not part of the engine Protocols; an engine uses it to publish KV events)."""
    attach = getattr(engine, "attach_bus", None)
    if callable(attach):
        attach(bus, wid)


async def run_worker(role: str, cfg: Any, wid: str, engine: Any, service: Any, stop: asyncio.Event) -> None:
    """A worker's life: bus, engine, ``service(cfg, engine, bus, wid)`` until ``stop`` is set or the
    service reports its engine dead (``EngineDead``); everything closed in reverse order."""
    bus = await Bus.connect(cfg.bus, f"{role}-{wid}")
    try:
        await bus.ensure_prefilled_stream()
        attach_bus(engine, bus, wid)
        await engine.start()
        try:
            svc = service(cfg, engine, bus, wid)
            try:
                await svc.start()
                await wait_any(stop, svc.dead)
            finally:
                await svc.shutdown()
            if svc.dead.is_set() and not stop.is_set():
                raise EngineDead(f"{role} worker {wid}: the engine died")
        finally:
            await engine.stop()
    finally:
        await bus.close()


async def engine_failed(exc: BaseException, cancelled: bool, what: str,
                        end_error: Callable[..., Awaitable[None]], dead: asyncio.Event) -> str:
    """An engine exception ended one request (call it from the ``except`` block): end its stream
    with a typed error (``cancelled`` when the client had cancelled it) and, when the engine itself
    died, set ``dead`` so the worker stops. Returns the request's outcome label."""
    if cancelled:
        await end_error("cancelled", "request cancelled", 499, "abort")
        return "cancelled"
    log.exception(f"{what.replace(' ', '_')}_failed")
    await end_error("engine", f"{what} failed: {exc!r}", 500)
    if isinstance(exc, EngineDead):
        dead.set()
    return "engine_error"
