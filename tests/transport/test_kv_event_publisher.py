"""KvEventPublisher on a real nats-server: batching, numbering, snapshots, bounds."""

from __future__ import annotations


import pytest
from nats.js.api import DeliverPolicy

from kvrelay.schemas.codec import unpack, pack
from kvrelay.schemas.kv_events import KvEventBatch, KvSnapshot, KvSnapshotRequest
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.transport.kv_event_publisher import KvEventPublisher, KvPublisherConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def kv_config(bus_config: BusConfig) -> BusConfig:
    """Small, memory-backed event streams: many tests share one server's JetStream budget."""
    return bus_config.replace(kv_events=StreamLimits(max_msgs=1000, max_bytes=1 << 20, max_age_s=60.0,
                                                     discard="old", storage="memory"))


async def _read_stream(bus: Bus, n: int) -> list[KvEventBatch]:
    s = bus.subjects
    sub = await bus.js.subscribe(s.kv_events_all, stream=s.stream_kv_events, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL)
    try:
        return [unpack((await sub.next_msg(timeout=5)).data, KvEventBatch) for _ in range(n)]
    finally:
        await sub.unsubscribe()


async def test_kv_event_publisher_batches_and_numbers(kv_config: BusConfig) -> None:
    bus = await Bus.connect(kv_config, "w1")
    pub = KvEventPublisher(bus, "w1", "spec", lambda: [], KvPublisherConfig(max_batch=2), epoch=9)
    try:
        await pub.start()
        for h in range(5):
            pub.stored([h])
        await pub.flush()
        batches = await _read_stream(bus, 3)
        assert [b.event_id for b in batches] == [1, 2, 3]
        assert [len(b.events) for b in batches] == [2, 2, 1]
        assert {b.epoch for b in batches} == {9} and {b.worker_id for b in batches} == {"w1"}
        assert [e.block_hashes for b in batches for e in b.events] == [[0], [1], [2], [3], [4]]
    finally:
        await pub.close()
        await bus.close()


async def test_kv_event_publisher_flushes_after_max_delay(kv_config: BusConfig) -> None:
    bus = await Bus.connect(kv_config, "w1")
    pub = KvEventPublisher(bus, "w1", "spec", lambda: [], KvPublisherConfig(max_delay_s=0.01), epoch=1)
    try:
        await pub.start()
        pub.removed([7])  # one event, far below max_batch: the background task sends it
        (batch,) = await _read_stream(bus, 1)
        assert batch.events[0].kind == "removed" and batch.events[0].block_hashes == [7]
    finally:
        await pub.close()
        await bus.close()


async def test_kv_event_publisher_answers_snapshot_requests(kv_config: BusConfig) -> None:
    bus = await Bus.connect(kv_config, "w1")
    held = [5, 6, 6]
    pub = KvEventPublisher(bus, "w1", "spec", lambda: held, epoch=3)
    try:
        await pub.start()
        pub.stored([5, 6])
        inbox = bus.nc.new_inbox()
        sub = await bus.nc.subscribe(inbox)
        await bus.publish(bus.subjects.kv_snapshot("w1"), pack(
            KvSnapshotRequest(router_id="r", reply_to=inbox, reason="test")))
        snap = unpack((await sub.next_msg(timeout=5)).data, KvSnapshot)
        # the buffered event was numbered first, so the snapshot is "after event 1"
        assert (snap.event_id, snap.epoch, snap.block_hashes, snap.chunks) == (1, 3, [5, 6, 6], 1)
        await bus.publish(bus.subjects.kv_snapshot("w1"), b"junk")
        await bus.publish(bus.subjects.kv_snapshot("w1"), pack(
            KvSnapshotRequest(router_id="r", reply_to="bad subject *", reason="test")))
        # one subscription delivers in order and its handler takes one message at a time: once a
        # later good request is answered, both bad ones were seen
        await bus.publish(bus.subjects.kv_snapshot("w1"), pack(
            KvSnapshotRequest(router_id="r", reply_to=inbox, reason="test")))
        unpack((await sub.next_msg(timeout=10)).data, KvSnapshot)
        assert pub.counters["bad_requests"] == 2
    finally:
        await pub.close()
        await bus.close()


def test_kv_event_publisher_config_is_bounded() -> None:
    with pytest.raises(ValueError):
        KvPublisherConfig(max_batch=10, max_buffer=5)
    with pytest.raises(ValueError):
        KvPublisherConfig(max_delay_s=0)
