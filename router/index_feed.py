"""The router's side of KV events: consume the stream into the prefix index, resync on gaps.

``KvEventsSubscriber`` reads ``kv.events.*`` from the JetStream stream through an ordered
consumer that starts at the beginning of what the stream retains, so a restarted router
rebuilds its index by replay; whatever the bounded stream already dropped shows up as an
event-id gap (or a late first id), and that worker is asked for a snapshot on
``kv.snapshot.<worker>``. Snapshot chunks come back on a per-request inbox; the index applies
them and replays the batches it held meanwhile.

Bounds: one snapshot request in flight per worker, each waiting at most
``kv_snapshot_timeout_s`` and retried with doubling back-off (at most ``max_retries`` times,
then the worker stays stale, ignored by routing, until its next batch asks again). Undecodable
batches are dropped and counted. The subscription has the bus's pending limits.
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvrelay.base.logs import get_logger
from kvrelay.router.index import PrefixIndex
from kvrelay.schemas.codec import unpack, pack
from kvrelay.schemas.errors import SchemaError
from kvrelay.schemas.kv_events import KvEventBatch, KvSnapshot, KvSnapshotRequest
from kvrelay.transport.bus import Bus
from kvrelay.transport.errors import BusUnavailable, TransportError

log = get_logger(__name__)


class KvEventsSubscriber:
    """Owns the stream subscription and the snapshot tasks (``start`` / ``close``)."""

    def __init__(self, bus: Bus, index: PrefixIndex, router_id: str, snapshot_timeout_s: float = 5.0,
                 max_retries: int = 5) -> None:
        self.bus, self.index, self.router_id = bus, index, router_id
        self.snapshot_timeout_s = snapshot_timeout_s
        self.max_retries = max_retries
        self._sub = None
        self._resyncs: dict[str, asyncio.Task] = {}
        self.counters = dict.fromkeys(("batches", "bad_batches", "snapshots", "snapshot_failures"), 0)
        self.applied = asyncio.Event()  # set after every batch handled (even undecodable) or snapshot

    async def start(self) -> None:
        await self.bus.ensure_kv_events_stream()
        s = self.bus.subjects
        self._sub = await self.bus.subscribe_stream(s.kv_events_all, s.stream_kv_events, self._on_batch)

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self.bus.unsubscribe(self._sub)
            except BusUnavailable:
                pass
            self._sub = None
        tasks = list(self._resyncs.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resyncs.clear()

    def remove_worker(self, worker_id: str) -> None:
        """A worker left (discovery): forget it and stop resyncing it."""
        task = self._resyncs.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self.index.remove_worker(worker_id)

    # --- events ---------------------------------------------------------------------------------
    async def _on_batch(self, msg: Msg) -> None:
        try:
            batch = unpack(msg.data, KvEventBatch)
        except SchemaError as exc:
            self.counters["bad_batches"] += 1
            log.warning("kv_event_batch_rejected", subject=msg.subject, error=str(exc))
            self.applied.set()
            return
        result = self.index.apply(batch)
        self.counters["batches"] += 1
        if result.status == "rejected":
            log.error("kv_events_rejected", worker=batch.worker_id, reason=result.reason)
        elif result.resync:
            log.info("kv_events_gap", worker=batch.worker_id, reason=result.reason)
            self.request_resync(batch.worker_id)
        elif self.index.is_stale(batch.worker_id) and batch.worker_id not in self._resyncs:
            self.request_resync(batch.worker_id)  # a previous resync gave up: try again
        self.applied.set()

    def request_resync(self, worker_id: str) -> None:
        if worker_id not in self._resyncs:
            task = asyncio.create_task(self._resync(worker_id), name=f"kv-resync-{worker_id}")
            self._resyncs[worker_id] = task
            task.add_done_callback(lambda t, w=worker_id: self._resyncs.pop(w, None)
                                   if self._resyncs.get(w) is t else None)

    async def _resync(self, worker_id: str) -> None:
        delay = 0.1
        for attempt in range(1 + self.max_retries):
            try:
                chunks = await self._fetch_snapshot(worker_id)
            except (TransportError, SchemaError) as exc:
                self.counters["snapshot_failures"] += 1
                log.warning("kv_snapshot_failed", worker=worker_id, attempt=attempt, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            head = chunks[0]
            hashes = [h for c in chunks for h in c.block_hashes]
            result = self.index.apply_snapshot(worker_id, head.spec, head.epoch, head.event_id, hashes)
            self.counters["snapshots"] += 1
            log.info("kv_snapshot_applied", worker=worker_id, event_id=head.event_id, blocks=len(hashes),
                     status=result.status)
            self.applied.set()
            if result.status == "rejected":
                log.error("kv_snapshot_rejected", worker=worker_id, reason=result.reason)
                return
            if not result.resync:
                return
        log.error("kv_resync_gave_up", worker=worker_id, attempts=1 + self.max_retries)

    async def _fetch_snapshot(self, worker_id: str) -> list[KvSnapshot]:
        """Ask one worker for its snapshot and collect every chunk (bounded wait)."""
        inbox = self.bus.new_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=1 << 16)

        async def on_chunk(msg: Msg) -> None:
            if not queue.full():
                queue.put_nowait(msg)

        sub = await self.bus.subscribe(inbox, on_chunk)
        try:
            req = KvSnapshotRequest(router_id=self.router_id, reply_to=inbox, reason="gap")
            await self.bus.publish(self.bus.subjects.kv_snapshot(worker_id), pack(req))
            got: dict[int, KvSnapshot] = {}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.snapshot_timeout_s
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TransportError(
                        f"snapshot of {worker_id} incomplete after {self.snapshot_timeout_s}s")
                try:
                    msg = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    continue
                chunk = unpack(msg.data, KvSnapshot)
                if chunk.worker_id != worker_id:
                    raise SchemaError(f"asked {worker_id} for a snapshot, got one of {chunk.worker_id}")
                got[chunk.chunk] = chunk
                if len(got) == chunk.chunks:
                    return [got[i] for i in range(chunk.chunks)]
        finally:
            try:
                await self.bus.unsubscribe(sub)
            except BusUnavailable:
                pass


class KvIndexCollector:
    """Prometheus collector for the prefix index and the event subscriber (register it on the
    router's registry): sizes, staleness, and every count that must never be silent, such as
    hash-spec mismatches."""

    _COUNTERS = {
        "applied_blocks": "Block hashes applied from KV events",
        "duplicates": "KV event batches ignored as already applied",
        "gaps": "Event-id gaps seen (each triggers a snapshot resync)",
        "rejected": "KV event batches or snapshots rejected",
        "spec_mismatches": "Workers whose block size or hash seed differ from the router's",
        "evictions": "Block hashes evicted by the index cap (LRU)",
        "unknown_removes": "Removed events for hashes the index did not hold",
        "pending_dropped": "Batches dropped while a worker was stale",
        "orphan_blocks": "Stored blocks skipped: their parent block is not held by that worker",
        "cascaded_blocks": "Blocks cleared below a block their worker removed",
        "bad_chains": "Stored events refused: a hash repeated in one chain (a broken or hostile worker)",
        "refused_links": "Parent links refused: they would have closed a cycle (contradicting chains)",
    }

    def __init__(self, index: PrefixIndex, subscriber: KvEventsSubscriber | None = None) -> None:
        self.index, self.subscriber = index, subscriber

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        st = self.index.stats()
        for name, value, doc in (("blocks", st["blocks"], "Distinct block hashes indexed"),
                                 ("entries", st["entries"], "(worker, block) entries indexed"),
                                 ("workers", st["workers"], "Workers in the prefix index"),
                                 ("stale_workers", len(st["stale_workers"]),
                                  "Workers waiting for a snapshot"),
                                 ("bytes", self.index.nbytes(), "Memory of the prefix index's storage"),
                                 ("native", int(st["impl"] == "native"),
                                  "1 when the index runs on its C storage, 0 on the pure-Python one")):
            yield GaugeMetricFamily(f"kvrelay_router_kv_index_{name}", doc, value=value)
        for key, doc in self._COUNTERS.items():
            yield CounterMetricFamily(f"kvrelay_router_kv_{key}", doc, value=st[key])
        if self.subscriber is not None:
            c = self.subscriber.counters
            yield CounterMetricFamily("kvrelay_router_kv_bad_batches", "Undecodable KV event batches",
                                      value=c["bad_batches"])
            yield CounterMetricFamily("kvrelay_router_kv_snapshots", "Snapshots applied",
                                      value=c["snapshots"])
            yield CounterMetricFamily("kvrelay_router_kv_snapshot_failures",
                                      "Snapshot requests that failed", value=c["snapshot_failures"])
