"""A worker's side of KV events: batch, number and publish them; answer snapshot requests.

Workers call ``stored`` / ``removed`` / ``cleared`` as their cache changes (synchronous, never
blocks). A background task publishes ``KvEventBatch`` messages to ``kv.events.<worker>`` on the
JetStream stream (bounded retention, ``BusConfig.kv_events``): a batch leaves when it has
``max_batch`` events or its oldest event is ``max_delay_s`` old. Batches are numbered 1, 2, ...
within an epoch (a new epoch per publisher: the cache starts empty).

Bounds and policies: at most ``max_buffer`` events wait to be published. Past it, new events
are dropped and counted, and the publisher skips an event id on purpose: routers see the gap
and ask for a snapshot, which carries the full state, so nothing stays wrong. A batch that
fails to publish is dropped the same way (its id becomes the gap).

Snapshots: routers request one on ``kv.snapshot.<worker>``; the publisher first numbers what is
buffered (so the snapshot is exactly "after event N"), reads the worker's state through
``held()`` in the same step, and publishes the ``KvSnapshot`` chunks to the request's
``reply_to``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nats.aio.msg import Msg

from kvrelay.base.logs import get_logger
from kvrelay.base.tasks import cancel_and_wait
from kvrelay.schemas.codec import unpack, pack
from kvrelay.schemas.errors import SchemaError
from kvrelay.schemas.kv_events import KvEvent, KvEventBatch, KvSnapshotRequest, snapshot_chunks
from kvrelay.transport.bus import Bus
from kvrelay.transport.errors import TransportError
from kvrelay.transport.subjects import check_subject

log = get_logger(__name__)


@dataclass(frozen=True)
class KvPublisherConfig:
    max_batch: int = 256  # events per batch
    max_delay_s: float = 0.005  # how long an event may wait for company
    max_buffer: int = 65536  # events waiting to be published; past it: drop, count, force resync
    publish_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_buffer < self.max_batch or self.max_delay_s <= 0:
            raise ValueError("need max_batch >= 1, max_buffer >= max_batch, max_delay_s > 0")


class KvEventPublisher:
    """Owns one background task (``start`` / ``close``). ``held()`` returns every hash the
    worker holds right now (a hash held twice listed twice), for snapshots."""

    def __init__(self, bus: Bus, worker_id: str, spec: str, held: Callable[[], Sequence[int]],
                 cfg: KvPublisherConfig | None = None, epoch: int | None = None) -> None:
        self.bus, self.worker_id, self.spec, self.held = bus, worker_id, spec, held
        self.cfg = cfg or KvPublisherConfig()
        self.epoch = time.time_ns() if epoch is None else epoch
        self.subject = bus.subjects.kv_events(worker_id)
        self._buffer: list[KvEvent] = []
        self._oldest = 0.0
        self._next_id = 1
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sub = None
        self._lock = asyncio.Lock()  # one publish at a time keeps ids in order on the stream
        self.counters = dict.fromkeys(("batches", "events", "dropped_events", "failed_batches",
                                       "snapshots", "bad_requests"), 0)

    @property
    def last_event_id(self) -> int:
        """The id of the last batch numbered (published or skipped)."""
        return self._next_id - 1

    async def start(self) -> None:
        await self.bus.ensure_kv_events_stream()
        self._sub = await self.bus.subscribe(self.bus.subjects.kv_snapshot(self.worker_id), self._on_snapshot)
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.worker_id}")

    async def close(self) -> None:
        """Publish what is buffered, then stop."""
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        if self._sub is not None:
            await self.bus.unsubscribe(self._sub)
            self._sub = None
        await self.flush()

    # --- the worker's calls (synchronous) ----------------------------------------------------------
    def stored(self, hashes: Sequence[int], parent: int | None = None, num_tokens: int = 0) -> None:
        self._add(KvEvent.stored(hashes, parent=parent, num_tokens=num_tokens))

    def removed(self, hashes: Sequence[int]) -> None:
        self._add(KvEvent.removed(hashes))

    def cleared(self) -> None:
        self._add(KvEvent.cleared())

    def _add(self, event: KvEvent) -> None:
        if len(self._buffer) >= self.cfg.max_buffer:
            self.counters["dropped_events"] += 1
            self._skip_id("buffer_full")
            return
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer.append(event)
        if len(self._buffer) == 1 or len(self._buffer) >= self.cfg.max_batch:
            self._wake.set()

    def _skip_id(self, why: str) -> None:
        """Leave a hole in the ids so routers resync from a snapshot."""
        if self._buffer:
            self._buffer.clear()
        self._next_id += 1
        log.warning("kv_events_forced_resync", worker=self.worker_id, reason=why, skipped=self._next_id - 1)

    # --- publishing ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            wait = self._oldest + self.cfg.max_delay_s - time.monotonic()
            if 0 < wait and len(self._buffer) < self.cfg.max_batch:
                await asyncio.sleep(wait)
            await self.flush()

    def _take(self) -> KvEventBatch | None:
        """Number the next batch from the buffer (synchronous: no await between id and state)."""
        if not self._buffer:
            return None
        events, self._buffer = self._buffer[: self.cfg.max_batch], self._buffer[self.cfg.max_batch:]
        if self._buffer:
            self._oldest = time.monotonic()
        batch = KvEventBatch(worker_id=self.worker_id, epoch=self.epoch, event_id=self._next_id,
                             spec=self.spec, events=events, sent_ms=int(time.time() * 1000))
        self._next_id += 1
        return batch

    async def flush(self) -> None:
        """Publish everything buffered now."""
        while True:
            batch = self._take()
            if batch is None:
                return
            await self._publish(batch)

    async def _publish(self, batch: KvEventBatch) -> None:
        async with self._lock:
            try:
                await self.bus.js_publish(self.subject, pack(batch), timeout=self.cfg.publish_timeout_s,
                                          msg_id=f"{self.worker_id}:{batch.epoch}:{batch.event_id}")
            except (TransportError, SchemaError) as exc:
                # the id is now a gap: routers will ask for a snapshot
                self.counters["failed_batches"] += 1
                log.warning("kv_events_publish_failed", worker=self.worker_id, event_id=batch.event_id,
                            error=repr(exc))
                return
        self.counters["batches"] += 1
        self.counters["events"] += len(batch.events)

    # --- snapshots -------------------------------------------------------------------------------------
    async def _on_snapshot(self, msg: Msg) -> None:
        try:
            req = unpack(msg.data, KvSnapshotRequest)
            check_subject(req.reply_to, "reply_to")
        except (SchemaError, ValueError) as exc:
            self.counters["bad_requests"] += 1
            log.warning("kv_snapshot_bad_request", worker=self.worker_id, error=str(exc))
            return
        pending = []
        while (batch := self._take()) is not None:  # number what is buffered ...
            pending.append(batch)
        chunks = snapshot_chunks(self.worker_id, self.epoch, self.last_event_id, self.spec,
                                 list(self.held()))  # ... and read the state in the same step
        for batch in pending:
            await self._publish(batch)
        try:
            for chunk in chunks:
                await self.bus.publish(req.reply_to, chunk)
        except TransportError as exc:
            log.warning("kv_snapshot_send_failed", worker=self.worker_id, error=repr(exc))
            return
        self.counters["snapshots"] += 1
        log.info("kv_snapshot_sent", worker=self.worker_id, router=req.router_id, reason=req.reason,
                 event_id=chunks[0].event_id, blocks=sum(len(c.hashes) // 8 for c in chunks))
