"""KV events end to end on a real nats-server: publish -> JetStream -> index; gaps; restarts."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest

from kvrelay.router.index_feed import KvEventsSubscriber
from kvrelay.router.index import PrefixIndex
from kvrelay.schemas.codec import pack
from kvrelay.schemas.hashing import HashSpec
from kvrelay.schemas.kv_events import KvEvent, KvEventBatch
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.transport.kv_event_publisher import KvEventPublisher, KvPublisherConfig

SPEC = HashSpec(32).fingerprint
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def kv_config(bus_config: BusConfig) -> BusConfig:
    """Small, memory-backed event streams: many tests share one server's JetStream budget."""
    return bus_config.replace(kv_events=StreamLimits(max_msgs=1000, max_bytes=1 << 20, max_age_s=60.0,
                                                     discard="old", storage="memory"))


class FakeCache:
    """What a worker holds: the publisher reports changes and serves it for snapshots."""

    def __init__(self) -> None:
        self.refs: Counter[int] = Counter()

    def store(self, pub: KvEventPublisher, hashes: list[int]) -> None:
        self.refs.update(hashes)
        pub.stored(hashes)

    def remove(self, pub: KvEventPublisher, hashes: list[int]) -> None:
        self.refs.subtract(hashes)
        pub.removed(hashes)

    def held(self) -> list[int]:
        return [h for h, n in self.refs.items() for _ in range(n)]


async def until(sub: KvEventsSubscriber, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for ``cond`` re-checking after every applied batch or snapshot."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        sub.applied.clear()
        if cond():
            return
        left = deadline - loop.time()
        assert left > 0, "condition not reached in time"
        try:
            await asyncio.wait_for(sub.applied.wait(), left)
        except asyncio.TimeoutError:
            pass


def _synced(index: PrefixIndex, wid: str, expected: list[int]) -> bool:
    return wid in index.workers() and not index.is_stale(wid) and sorted(index.snapshot(wid)) == expected


async def _router(cfg: BusConfig, name: str = "r1") -> tuple[Bus, PrefixIndex, KvEventsSubscriber]:
    bus = await Bus.connect(cfg, name)
    index = PrefixIndex(SPEC)
    sub = KvEventsSubscriber(bus, index, name, snapshot_timeout_s=10.0)
    await sub.start()
    return bus, index, sub


async def _worker(cfg: BusConfig, wid: str, cache: FakeCache, **kw) -> tuple[Bus, KvEventPublisher]:
    bus = await Bus.connect(cfg, wid)
    pub = KvEventPublisher(bus, wid, SPEC, cache.held, KvPublisherConfig(**kw), epoch=1)
    await pub.start()
    return bus, pub


async def test_events_flow_from_publisher_to_index(kv_config: BusConfig) -> None:
    rbus, index, sub = await _router(kv_config)
    cache = FakeCache()
    wbus, pub = await _worker(kv_config, "w1", cache)
    try:
        cache.store(pub, [1, 2, 3])
        cache.store(pub, [1, 2])  # stored twice: counted
        cache.remove(pub, [3])
        await until(sub, lambda: index.match([1, 2, 3]) == {"w1": 2})
        cache.remove(pub, [1, 2])
        await until(sub, lambda: index.last_event("w1") == (1, pub.last_event_id))
        assert index.match([1, 2]) == {"w1": 2}  # one reference left of each
        assert pub.counters["batches"] == pub.last_event_id >= 1
    finally:
        await pub.close()
        await sub.close()
        await wbus.close()
        await rbus.close()


async def test_events_gap_triggers_snapshot_resync(kv_config: BusConfig) -> None:
    rbus, index, sub = await _router(kv_config)
    cache = FakeCache()
    wbus, pub = await _worker(kv_config, "w1", cache)
    try:
        cache.store(pub, [1, 2])
        await until(sub, lambda: index.match([1, 2]) == {"w1": 2})
        # a batch is lost: the worker changed state but the router never hears of it
        cache.refs.subtract([2])
        cache.refs.update([7, 8])
        pub._next_id += 1  # the lost batch's id
        cache.store(pub, [9])  # the next batch reveals the gap
        await until(sub, lambda: sub.counters["snapshots"] >= 1 and not index.is_stale("w1"))
        assert sorted(index.snapshot("w1")) == [1, 7, 8, 9]
        assert index.counters["gaps"] == 1 and pub.counters["snapshots"] == 1
    finally:
        await pub.close()
        await sub.close()
        await wbus.close()
        await rbus.close()


async def test_events_restarted_router_rebuilds_from_replay_and_snapshot(kv_config: BusConfig) -> None:
    # a tiny stream: the oldest batches are gone by the time the new router starts
    tiny = StreamLimits(max_msgs=3, max_bytes=1 << 20, discard="old", storage="memory")
    cfg = kv_config.replace(kv_events=tiny)
    cache = FakeCache()
    wbus, pub = await _worker(cfg, "w1", cache, max_batch=1)
    rbus = None
    try:
        for i in range(10):
            cache.store(pub, [100 + i])
            await pub.flush()
        cache.remove(pub, [100])
        await pub.flush()
        rbus, index, sub = await _router(cfg, "r2")
        expected = sorted(cache.held())
        await until(sub, lambda: _synced(index, "w1", expected))
        assert index.counters["gaps"] == 1  # the late first id
        assert index.last_event("w1") == (1, pub.last_event_id)
        await sub.close()
    finally:
        await pub.close()
        await wbus.close()
        if rbus is not None:
            await rbus.close()


async def test_events_mismatched_spec_is_rejected_loudly(kv_config: BusConfig) -> None:
    rbus, index, sub = await _router(kv_config)
    try:
        batch = KvEventBatch(worker_id="w9", epoch=1, event_id=1, spec=HashSpec(16).fingerprint,
                             events=[KvEvent.stored([1])])
        await rbus.js_publish(rbus.subjects.kv_events("w9"), pack(batch))
        await rbus.publish(rbus.subjects.kv_events("w9"), b"not msgpack")  # core publish: stream too
        await until(sub, lambda: index.counters["spec_mismatches"] == 1 and sub.counters["bad_batches"] == 1)
        assert index.match([1]) == {}
    finally:
        await sub.close()
        await rbus.close()


async def test_events_publisher_buffer_full_forces_a_resync(kv_config: BusConfig) -> None:
    rbus, index, sub = await _router(kv_config)
    cache = FakeCache()
    wbus = await Bus.connect(kv_config, "w1")
    pub = KvEventPublisher(wbus, "w1", SPEC, cache.held, KvPublisherConfig(max_batch=2, max_buffer=2),
                           epoch=1)
    try:
        await pub.start()
        cache.store(pub, [1])
        await pub.flush()
        await until(sub, lambda: index.match([1]) == {"w1": 1})
        # no awaits: the buffer fills before the publisher task runs
        for h in (2, 3, 4, 5):
            cache.store(pub, [h])
        assert pub.counters["dropped_events"] >= 1
        cache.store(pub, [6])
        await pub.flush()
        expected = sorted(cache.held())
        await until(sub, lambda: _synced(index, "w1", expected))
        assert sub.counters["snapshots"] >= 1
    finally:
        await pub.close()
        await sub.close()
        await wbus.close()
        await rbus.close()


def test_kv_index_collector_shows_spec_mismatches() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from kvrelay.router.index_feed import KvIndexCollector

    idx = PrefixIndex(SPEC)
    for wid, spec in (("a", SPEC), ("b", HashSpec(16).fingerprint)):
        idx.apply(KvEventBatch(worker_id=wid, epoch=1, event_id=1, spec=spec,
                               events=[KvEvent.stored([1, 2])]))
    reg = CollectorRegistry()
    reg.register(KvIndexCollector(idx))
    text = generate_latest(reg).decode()
    assert "kvrelay_router_kv_spec_mismatches_total 1.0" in text
    assert "kvrelay_router_kv_index_blocks 2.0" in text
    assert "kvrelay_router_kv_index_stale_workers 0.0" in text
