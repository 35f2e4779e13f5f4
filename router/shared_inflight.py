"""Router replicas share their dispatch-time load so they do not pile onto the same worker.

Each router publishes its ``LoadLedger`` changes as ``InflightDelta`` messages on
``kvrelay.<ns>.inflight.<router>`` (core NATS, fire and forget) and applies the other routers'
deltas to a ``RemoteLoads`` table, which ``LoadLedger.views`` takes into its per-worker load:

    dispatched    (request, worker, prompt tokens not cached): the request counts on ``worker``
    prefill_done  the first token arrived: its prompt tokens no longer count
    released      finished, failed, refused or moved: it no longer counts

Bounds and policies:
- ``RemoteLoads`` holds at most ``max_entries`` remote requests; a new one past it evicts the
  oldest (counted). Every entry expires ``ttl`` after its last delta, ``ttl`` being the sender's
  request timeout (every request's deadline lies within it), capped by ``max_ttl_s``: a router
  that dies without saying ``released`` does not leave load behind for longer than that.
  Expired entries are dropped in insertion order when views are built, so one may outlive its
  ttl until the older ones have expired (at most ``max_ttl_s``).
- Outgoing deltas wait in a queue of ``max_queue``; past it they are dropped and counted (a lost
  ``dispatched`` undercounts briefly, a lost ``released`` is cleaned up by expiry).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import nats.errors
from nats.aio.msg import Msg

from kvrelay.base.logs import get_logger
from kvrelay.router.ledger import LoadLedger
from kvrelay.schemas.codec import Message, unpack, message
from kvrelay.schemas.errors import SchemaError
from kvrelay.schemas.struct import limit
from kvrelay.transport.bus import Bus
from kvrelay.transport.errors import BusUnavailable

log = get_logger(__name__)

Kind = Literal["dispatched", "prefill_done", "released"]


@message
class InflightDelta(Message):
    """Router -> ``kvrelay.<ns>.inflight.<router>``: one change to its dispatch-time load."""

    TYPE = "InflightDelta"

    router_id: str = limit(max_len=128)
    request_id: str = limit(max_len=256)
    kind: Literal["dispatched", "prefill_done", "released"]
    worker_id: str = limit("", max_len=128)
    tokens: int = limit(0, min=0, max=1 << 30)
    ttl_ms: int = limit(0, min=0, max=86_400_000)  # how long the sender may hold the request


def subject_token(router_id: str) -> str:
    """A router id as one subject token (ids may hold dots: host names)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", router_id)[:64] or "router"


class RemoteLoads:
    """Other routers' in-flight requests per worker. Pure and synchronous (clock injected)."""

    def __init__(self, max_entries: int = 65536, max_ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or max_ttl_s <= 0:
            raise ValueError("max_entries >= 1 and max_ttl_s > 0 are required")
        self.max_entries, self.max_ttl_s, self.clock = max_entries, max_ttl_s, clock
        # (router, request) -> [worker, tokens, expires_at]
        self._entries: OrderedDict[tuple[str, str], list] = OrderedDict()
        self._loads: dict[str, list[int]] = {}  # worker -> [requests, tokens]
        self.counters = dict.fromkeys(("applied", "evicted", "expired"), 0)

    def __len__(self) -> int:
        return len(self._entries)

    def apply(self, d: InflightDelta) -> None:
        key = (d.router_id, d.request_id)
        self.counters["applied"] += 1
        entry = self._entries.get(key)
        if d.kind == "released":
            if entry is not None:
                self._drop(key)
            return
        expires = self.clock() + min(d.ttl_ms / 1000, self.max_ttl_s)
        if d.kind == "prefill_done":
            if entry is not None:
                self._loads[entry[0]][1] -= entry[1]
                entry[1], entry[2] = 0, expires
                self._entries.move_to_end(key)
            return
        if entry is not None:
            self._drop(key)
        elif len(self._entries) >= self.max_entries:
            self._drop(next(iter(self._entries)))
            self.counters["evicted"] += 1
        self._entries[key] = [d.worker_id, d.tokens, expires]
        load = self._loads.setdefault(d.worker_id, [0, 0])
        load[0] += 1
        load[1] += d.tokens

    def forget_router(self, router_id: str) -> None:
        for key in [k for k in self._entries if k[0] == router_id]:
            self._drop(key)

    def expire(self) -> int:
        now, n = self.clock(), 0
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry[2] > now:
                break
            self._drop(key)
            n += 1
        self.counters["expired"] += n
        return n

    def load(self, worker_id: str) -> tuple[int, int]:
        """(remote requests in flight, their prompt tokens not yet prefilled) on ``worker_id``."""
        load = self._loads.get(worker_id)
        return (load[0], load[1]) if load else (0, 0)

    def _drop(self, key: tuple[str, str]) -> None:
        worker, tokens, _ = self._entries.pop(key)
        load = self._loads[worker]
        load[0] -= 1
        load[1] -= tokens
        if load[0] <= 0:
            del self._loads[worker]


class SharedInflight:
    """Publishes this router's table changes and applies the others'. Owns one subscription and
    one publishing task (``start`` / ``close``)."""

    def __init__(self, bus: Bus, table: LoadLedger, router_id: str, ttl_s: float,
                 max_entries: int = 65536, max_queue: int = 4096) -> None:
        self.bus, self.table, self.router_id = bus, table, router_id
        self.subject = bus.subjects.inflight(subject_token(router_id))
        self.ttl_ms = int(ttl_s * 1000)
        self.remote = RemoteLoads(max_entries, max_ttl_s=max(ttl_s, 0.001))
        self._queue: asyncio.Queue[InflightDelta] = asyncio.Queue(max_queue)
        self._sub = None
        self._task: asyncio.Task | None = None
        self.applied = asyncio.Event()  # set after every remote delta applied (tests, readiness)
        self.counters = dict.fromkeys(("sent", "dropped", "bad", "send_failed"), 0)

    async def start(self) -> None:
        self._sub = await self.bus.subscribe(self.bus.subjects.inflight_all, self._on_msg)
        self.table.remote = self.remote
        self.table.listener = self._on_local
        self._task = asyncio.create_task(self._send_loop(), name="shared-inflight")

    async def close(self) -> None:
        self.table.listener = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():  # say what is left (bounded by the queue), best effort
            await self._send(self._queue.get_nowait())
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    def _on_local(self, kind: Kind, request_id: str, worker_id: str, tokens: int) -> None:
        delta = InflightDelta(router_id=self.router_id, request_id=request_id, kind=kind,
                              worker_id=worker_id, tokens=tokens, ttl_ms=self.ttl_ms)
        try:
            self._queue.put_nowait(delta)
        except asyncio.QueueFull:
            self.counters["dropped"] += 1

    async def _send_loop(self) -> None:
        while True:
            await self._send(await self._queue.get())

    async def _send(self, delta: InflightDelta) -> None:
        try:
            await self.bus.publish(self.subject, delta)
            self.counters["sent"] += 1
        except BusUnavailable as exc:
            self.counters["send_failed"] += 1
            log.warning("inflight_delta_send_failed", error=str(exc))

    async def _on_msg(self, msg: Msg) -> None:
        try:
            delta = unpack(msg.data, InflightDelta)
        except SchemaError:
            self.counters["bad"] += 1
            return
        if delta.router_id == self.router_id:
            return
        self.remote.apply(delta)
        self.applied.set()
