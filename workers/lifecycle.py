"""The life of one worker service, shared by the prefill and decode roles.

``start()``: the metrics endpoint, a ``cancel.*`` subscription, the role's own subscriptions and
tasks (``_open``), the heartbeat. ``shutdown()``: set ``draining`` and announce it at once, let
the role finish its work within its bounds (``_drain``), then stop the heartbeat, cancel and await
every task the service owns, unsubscribe and stop the metrics endpoint. Whatever happens between,
``dead`` is set when the engine dies (``run_worker`` then stops the worker and raises).

A subclass keeps only its role: what it subscribes to and runs, how it drains, what a Cancel does
to its requests (``_cancel``), the load fields of its discovery record (``_load``) and its gauges.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from nats.aio.msg import Msg

from kvrelay.base.ids import now_ms
from kvrelay.base.logs import get_logger
from kvrelay.base.tasks import TaskOwner
from kvrelay.schemas.codec import unpack
from kvrelay.schemas.messages import Cancel, WorkerInfo
from kvrelay.transport.bus import Bus
from kvrelay.transport.discovery import Announcer
from kvrelay.transport.errors import TransportError
from kvrelay.workers.metrics import MetricsServer
from kvrelay.workers.service import heartbeat

log = get_logger(__name__)


class WorkerService:
    """A worker's bus presence and owned tasks; ``start()``, then ``shutdown()`` (always, even
    after a failed start). ``section`` is the role's config (``metrics_port``, ``drain_timeout_s``);
    ``capacity`` is the ``max_slots`` of its discovery record."""

    role = ""  # "prefill" / "decode"
    capacity_key = ""  # the config name of ``capacity`` (logged at start)

    def __init__(self, section: Any, engine: Any, bus: Bus, wid: str, capacity: int) -> None:
        self.cfg = section
        self.engine = engine
        self.bus = bus
        self.id = wid
        self.subjects = bus.subjects
        self.capacity = capacity
        self.draining = False
        self.dead = asyncio.Event()  # the engine died: run_worker shuts the worker down and raises
        self.owner = TaskOwner(f"{self.role}-{wid}")
        self.metrics = MetricsServer(section.metrics_port)
        self.announcer = Announcer(bus, wid, self.info)
        self._subs: list[Any] = []
        self._started_ms = now_ms()
        self._running = False  # start() completed

    # --- what a role provides -------------------------------------------------------------------
    async def _open(self) -> list[Any]:
        """Subscribe and spawn the role's tasks; returns the subscriptions to close at shutdown."""
        raise NotImplementedError

    def _stop_taking(self) -> None:
        """Called as ``draining`` is set, before anything is awaited."""

    async def _drain(self) -> None:
        """Let the work in hand finish, bounded; whatever is left is cancelled afterwards."""
        raise NotImplementedError

    async def _cancel(self, request_id: str, tenant: str) -> None:
        """A Cancel for ``request_id`` arrived on ``tenant``'s cancel subject: it counts only for a
        request of that tenant (the subject, not the body, says who sent it: nats-server lets a
        tenant publish on its own cancel subjects only)."""
        raise NotImplementedError

    def _load(self) -> dict[str, Any]:
        """The discovery record's load fields (``active``, ``free_kv_blocks``, ...)."""
        raise NotImplementedError

    def _gauges(self) -> None:
        """Bring the role's gauges up to date."""

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.metrics.start()
        self._subs = [await self.bus.subscribe(self.subjects.cancel_all, self.on_cancel)]
        self._subs += await self._open()
        self.owner.spawn(heartbeat(self.announcer, self.bus.cfg.heartbeat_s), "heartbeat")
        self._running = True
        log.info(f"{self.role}_worker_started", worker=self.id, **{self.capacity_key: self.capacity})

    async def shutdown(self) -> None:
        """Drain (bounded by the role's timeouts), then cancel and await everything started."""
        self.draining = True
        self._stop_taking()
        if self._running:  # routers see "draining" now, not at the next heartbeat
            try:
                await self.announcer.put_once()
            except TransportError as exc:
                log.warning("draining_announce_failed", error=repr(exc))
        await self._drain()
        self.announcer.stop()  # ends the heartbeat even if its cancel is lost (Announcer doc)
        await self.owner.close()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - the connection may already be gone
                log.warning("unsubscribe_failed", error=repr(exc))
        await self.metrics.stop()
        self._gauges()
        log.info(f"{self.role}_worker_stopped", worker=self.id)

    # --- requests -------------------------------------------------------------------------------
    async def abort(self, request_id: str) -> None:
        """Abort ``request_id`` in the engine: best effort, bounded by the bus request timeout."""
        try:
            await asyncio.wait_for(self.engine.abort(request_id), self.bus.cfg.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - best effort; the request is ending anyway
            log.warning("abort_failed", error=repr(exc))

    async def on_cancel(self, msg: Msg) -> None:
        try:
            cancel = unpack(msg.data, Cancel)
        except ValueError as exc:
            log.warning("bad_cancel", error=str(exc))
            return
        tenant = msg.subject.split(".")[-2]
        if cancel.request_id != msg.subject.rsplit(".", 1)[-1]:
            log.warning("bad_cancel", error="the body names another request than the subject")
            return
        await self._cancel(cancel.request_id, tenant)

    # --- reporting ------------------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        """This worker's discovery record (re-put every heartbeat)."""
        load = self._load()
        i = self.engine.info
        return WorkerInfo(
            worker_id=self.id, role=self.role, model=i.model, host=socket.gethostname(), pid=os.getpid(),
            started_ms=self._started_ms, heartbeat_ms=now_ms(), block_size=i.block_size,
            hash_seed=i.hash_seed, backends=list(i.backends), max_slots=self.capacity,
            draining=self.draining, max_model_len=i.max_model_len, **load,
        )
