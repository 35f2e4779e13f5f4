"""Discovery through the KV bucket, against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from kvrelay.schemas import WorkerInfo, pack
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig
from kvrelay.transport.discovery import Announcer, Directory


def _info(wid: str, role: str = "prefill") -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, model="m", host="h", block_size=32)


async def _wait_until(cond, directory: Directory, timeout: float = 5.0) -> None:
    async def loop() -> None:
        while not cond():
            directory.changed.clear()
            await directory.changed.wait()

    await asyncio.wait_for(loop(), timeout)


@contextlib.asynccontextmanager
async def _announced(bus_config: BusConfig,
                     wid: str) -> AsyncIterator[tuple[Directory, Announcer, asyncio.Task]]:
    """A directory watching the bucket and an announcer heartbeating ``wid``, seen live once."""
    bus = await Bus.connect(bus_config, "test")
    directory = Directory(bus)
    watch = asyncio.create_task(directory.run())
    ann = Announcer(bus, wid, lambda: _info(wid))
    beat = asyncio.create_task(ann.run())
    try:
        await _wait_until(lambda: [i.worker_id for i in directory.live("prefill")] == [wid], directory)
        yield directory, ann, beat
    finally:
        beat.cancel()
        watch.cancel()
        for t in (beat, watch):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await bus.close()


async def test_directory_sees_join_and_clean_leave(bus_config: BusConfig) -> None:
    async with _announced(bus_config, "p1") as (directory, _, beat):
        assert directory.live("decode") == []
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        await _wait_until(lambda: directory.live() == [], directory)


async def test_announcer_stop_ends_the_heartbeat_and_leaves_without_a_cancel(bus_config: BusConfig) -> None:
    """``stop()`` ends ``run()`` by itself (a cancel can be lost inside ``asyncio.wait_for`` on
    Python < 3.12), and the record is deleted on the way out."""
    async with _announced(bus_config, "p2") as (directory, ann, beat):
        ann.stop()
        await asyncio.wait_for(beat, 10)  # returns on its own: no cancel
        await _wait_until(lambda: directory.live() == [], directory)


def test_directory_ages_out_silent_workers_and_ignores_bad_records() -> None:
    now = [100.0]

    class FakeBus:  # only cfg is used by Directory outside run()
        cfg = BusConfig(worker_ttl_s=5.0)

    d = Directory(FakeBus(), max_workers=2, clock=lambda: now[0])  # type: ignore[arg-type]
    d.apply("a", pack(_info("a")))
    d.apply("bad", b"not msgpack at all")
    d.apply("b", pack(_info("b", "decode")))
    d.apply("c", pack(_info("c")))  # over the bound: ignored and counted
    assert sorted(i.worker_id for i in d.live()) == ["a", "b"]
    assert d.ignored == 1
    now[0] += 4.0
    d.apply("a", pack(_info("a")))  # a heartbeats, b stays silent
    now[0] += 2.0
    assert [i.worker_id for i in d.live()] == ["a"]


def test_directory_listeners_hear_each_record_change_with_the_record_before() -> None:
    class FakeBus:
        cfg = BusConfig()

    d = Directory(FakeBus())  # type: ignore[arg-type]
    heard: list[tuple[str | None, str | None]] = []
    d.listeners.append(lambda old, new: heard.append((old and old.role, new and new.role)))
    d.apply("a", pack(_info("a")))
    d.apply("a", pack(_info("a", "decode")))
    d.apply("bad", b"not msgpack at all")  # not a change
    d.apply("a", None)
    assert heard == [(None, "prefill"), ("prefill", "decode"), ("decode", None)]
