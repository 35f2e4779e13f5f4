"""Discovery and liveness through a NATS KV bucket with a TTL (no etcd).

Workers re-put their ``WorkerInfo`` every heartbeat (``Announcer``); the bucket's TTL forgets a
worker that stops. Routers watch the bucket (``Directory``) and also age entries out themselves,
because a KV TTL expiry sends no notification to watchers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import nats.errors
from nats.js.kv import KeyValue

from kvrelay.base.logs import get_logger
from kvrelay.schemas.codec import unpack, pack
from kvrelay.schemas.errors import SchemaError
from kvrelay.schemas.messages import WorkerInfo
from kvrelay.transport.bus import Bus

log = get_logger(__name__)


async def open_bucket(bus: Bus) -> KeyValue:
    """The workers bucket, created on first use; entries live ``worker_ttl_s`` after their last put."""
    return await bus.key_value(bus.subjects.bucket_workers, bus.cfg.worker_ttl_s, 16 << 20)


class Announcer:
    """Keeps one worker's record alive: ``run()`` re-puts ``info()`` every heartbeat until
    ``stop()`` or a cancel; on the way out the record is deleted so routers see a clean leave at
    once instead of after the TTL.

    Owners call ``stop()`` before cancelling the task: on Python < 3.12 ``asyncio.wait_for`` can
    swallow a cancel that lands as its inner call completes (a heartbeat put, here), and the task
    then heartbeats on until the next cancel; ``stop()`` ends the loop whatever the cancel did.
    """

    def __init__(self, bus: Bus, worker_id: str, info: Callable[[], WorkerInfo]) -> None:
        self.bus = bus
        self.worker_id = worker_id
        self.info = info
        self._kv: KeyValue | None = None
        self.stopped = False

    def stop(self) -> None:
        """End ``run()`` at its next step (it then deletes the record)."""
        self.stopped = True

    async def put_once(self) -> None:
        if self._kv is None:
            self._kv = await open_bucket(self.bus)
        try:
            await asyncio.wait_for(self._kv.put(self.worker_id, pack(self.info())), self.bus.cfg.request_timeout_s)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            log.warning("heartbeat_failed", error=repr(exc))

    async def run(self) -> None:
        try:
            while not self.stopped:
                await self.put_once()
                if not self.stopped:
                    await asyncio.sleep(self.bus.cfg.heartbeat_s)
        except asyncio.CancelledError:
            await self._leave()
            raise
        await self._leave()

    async def _leave(self) -> None:
        if self._kv is None:
            return
        try:
            await asyncio.wait_for(self._kv.delete(self.worker_id), self.bus.cfg.request_timeout_s)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            log.warning("leave_failed", error=repr(exc))


class Directory:
    """A router's view of live workers, fed by a watch on the bucket.

    Bounded: at most ``max_workers`` records (further new workers are ignored and counted).
    A record is live while its last put is younger than the TTL (by the router's own clock).
    """

    def __init__(self, bus: Bus, max_workers: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.max_workers = max_workers
        self.clock = clock
        self._seen: dict[str, tuple[WorkerInfo, float]] = {}
        self.ignored = 0
        self.changed = asyncio.Event()
        # called with (old record, new record) on every update (None: absent / removed); must not block
        self.listeners: list[Callable[[WorkerInfo | None, WorkerInfo | None], None]] = []
        self.synced = asyncio.Event()  # set once the watch delivered the bucket's initial records

    def apply(self, key: str, value: bytes | None) -> None:
        """One bucket update: a put (record) or a delete/purge (value None)."""
        old = self._seen.get(key)
        info: WorkerInfo | None = None
        if not value:
            self._seen.pop(key, None)
        else:
            try:
                info = unpack(value, WorkerInfo)
            except SchemaError as exc:
                log.warning("bad_worker_record", key=key, error=str(exc))
                return
            if key not in self._seen and len(self._seen) >= self.max_workers:
                self.ignored += 1
                return
            self._seen[key] = (info, self.clock())
        self.changed.set()
        for listener in self.listeners:
            listener(old[0] if old else None, info)

    def live(self, role: str | None = None) -> list[WorkerInfo]:
        now, ttl = self.clock(), self.bus.cfg.worker_ttl_s
        for key in [k for k, (_, t) in self._seen.items() if now - t > ttl]:
            del self._seen[key]
        return [i for i, _ in self._seen.values() if role is None or i.role in (role, "both")]

    def started_ms(self, worker_id: str) -> int:
        """When the worker's live record says it started (tells a restarted worker of the same id
        from the one before); 0 when it is unknown."""
        entry = self._seen.get(worker_id)
        return entry[0].started_ms if entry else 0

    def get(self, worker_id: str) -> WorkerInfo | None:
        entry = self._seen.get(worker_id)
        return entry[0] if entry else None

    async def run(self) -> None:
        """Watch the bucket until cancelled (the owner cancels and awaits this task)."""
        kv = await open_bucket(self.bus)
        watcher = await kv.watchall()
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=5.0)
                except nats.errors.TimeoutError:
                    continue
                if entry is None:  # end of the initial values
                    self.synced.set()
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                self.apply(entry.key, None if deleted else entry.value)
        finally:
            try:
                await asyncio.wait_for(watcher.stop(), 2.0)
            except (nats.errors.Error, asyncio.TimeoutError):
                pass
