"""The index follows discovery: live workers it does not know are asked for snapshots, departed
ones are dropped. ``plan`` is pure; the rest runs on a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from kvrelay.router.index_feed import KvEventsSubscriber
from kvrelay.router.index import PrefixIndex
from kvrelay.router.membership import IndexMembership, plan
from kvrelay.schemas.hashing import HashSpec
from kvrelay.schemas.messages import WorkerInfo
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.transport.discovery import Announcer, Directory
from kvrelay.transport.kv_event_publisher import KvEventPublisher

SPEC = HashSpec(32).fingerprint
pytestmark = pytest.mark.timeout(60)


def test_plan_asks_unknown_live_workers_and_drops_departed_ones() -> None:
    p = plan(live={"a": 1, "b": 2}, indexed=["b", "gone"], asked={})
    assert (p.ask, p.drop) == (["a"], ["gone"])


def test_plan_asks_each_incarnation_once() -> None:
    assert plan(live={"a": 1}, indexed=[], asked={"a": 1}).ask == []  # asked, never answered
    assert plan(live={"a": 2}, indexed=[], asked={"a": 1}).ask == ["a"]  # it restarted


def test_plan_leaves_known_live_workers_alone() -> None:
    p = plan(live={"a": 1}, indexed=["a"], asked={"a": 1})
    assert (p.ask, p.drop) == ([], [])


class _Dir:
    def __init__(self, live: list[WorkerInfo]) -> None:
        self._live, self.synced = live, asyncio.Event()

    def live(self) -> list[WorkerInfo]:
        return list(self._live)


class _Sub:
    def __init__(self) -> None:
        self.index = PrefixIndex(SPEC)
        self.resyncs: list[str] = []
        self.removed: list[str] = []

    def request_resync(self, w: str) -> None:
        self.resyncs.append(w)

    def remove_worker(self, w: str) -> None:
        self.removed.append(w)
        self.index.remove_worker(w)


def _info(wid: str, started_ms: int = 1) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role="prefill", model="m", host="h", block_size=32, started_ms=started_ms)


def test_index_membership_sync_forgets_asked_workers_that_left() -> None:
    d, sub = _Dir([_info("a")]), _Sub()
    m = IndexMembership(d, sub)
    assert m.sync().ask == ["a"] and m.sync().ask == []
    d._live = []
    m.sync()
    d._live = [_info("a")]  # the same incarnation back after a partition: ask again
    assert m.sync().ask == ["a"] and sub.resyncs == ["a", "a"]
    assert m.counters == {"asked": 2, "dropped": 0}


@pytest.fixture
def kv_config(bus_config: BusConfig) -> BusConfig:
    return bus_config.replace(kv_events=StreamLimits(max_msgs=1000, max_bytes=1 << 20, max_age_s=60.0,
                                                     discard="old", storage="memory"))


async def _until(cond: Callable[[], bool], event: asyncio.Event, timeout: float = 30.0) -> None:
    """Wait for ``cond``, re-checking whenever ``event`` fires (bounded by ``timeout``)."""
    async def loop() -> None:
        while not cond():
            event.clear()
            if not cond():
                await event.wait()
    await asyncio.wait_for(loop(), timeout)


async def test_index_membership_snapshots_a_silent_worker_and_drops_it_when_it_leaves(kv_config: BusConfig) -> None:
    """A worker that never published an event is still indexed (from its snapshot), and its
    clean leave (record deleted) removes it and its blocks."""
    rbus, wbus = await Bus.connect(kv_config, "r1"), await Bus.connect(kv_config, "w1")
    index = PrefixIndex(SPEC)
    sub = KvEventsSubscriber(rbus, index, "r1", snapshot_timeout_s=10.0)
    pub = KvEventPublisher(wbus, "w1", SPEC, lambda: [11, 12, 13], epoch=1)
    directory = Directory(rbus)
    announcer = Announcer(wbus, "w1", lambda: _info("w1"))
    tasks: list[asyncio.Task] = []
    try:
        await sub.start()
        await pub.start()
        tasks.append(asyncio.create_task(directory.run()))
        announcer_task = asyncio.create_task(announcer.run())
        membership = IndexMembership(directory, sub, interval_s=0.05)
        tasks.append(asyncio.create_task(membership.run()))
        await _until(lambda: "w1" in index.workers() and sorted(index.snapshot("w1")) == [11, 12, 13],
                     sub.applied)
        assert pub.counters["snapshots"] == 1 and membership.counters["asked"] == 1
        announcer_task.cancel()  # a clean exit deletes the record
        with pytest.raises(asyncio.CancelledError):
            await announcer_task
        await _until(lambda: "w1" not in index.workers(), membership.ticked)
        assert len(index) == 0 and membership.counters["dropped"] == 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sub.close()
        await pub.close()
        await rbus.close()
        await wbus.close()
