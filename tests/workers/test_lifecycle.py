"""The lifecycle every worker service shares (``WorkerService``), with a minimal role on a real
nats-server: the discovery record, draining before the role drains, cancels, bounded aborts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from workers_fake_engines import FakeDecodeEngine
from workers_harness import config, record_gone, worker_record

from kvrelay.schemas.messages import Cancel
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig
from kvrelay.workers.lifecycle import WorkerService

pytestmark = pytest.mark.timeout(60)


class Role(WorkerService):
    """A role that runs one background task, reports a fixed load and records what reaches it."""

    role = "prefill"
    capacity_key = "max_running"

    def __init__(self, bus: Bus, engine: Any) -> None:
        section = config(bus.cfg).worker_process().prefill
        super().__init__(section, engine, bus, "w1", 3)
        self.cancels: asyncio.Queue[str] = asyncio.Queue()
        self.draining_seen: bool | None = None
        self.drain_entered = asyncio.Event()
        self.finish_drain = asyncio.Event()
        self.background: asyncio.Task[Any] | None = None

    async def _open(self) -> list[Any]:
        self.background = self.owner.spawn(asyncio.Event().wait(), "forever")
        return [await self.bus.subscribe(self.subjects.prefill(self.id), self._on_task)]

    async def _on_task(self, msg: Any) -> None:
        pass

    async def _drain(self) -> None:
        self.draining_seen = self.draining
        self.drain_entered.set()
        await asyncio.wait_for(self.finish_drain.wait(), 30)

    async def _cancel(self, request_id: str, tenant: str) -> None:
        self.cancels.put_nowait((tenant, request_id))

    def _load(self) -> dict[str, Any]:
        return {"active": 2, "queued": 1, "free_kv_blocks": 7}


class StuckAbort(FakeDecodeEngine):
    async def abort(self, request_id: str) -> None:
        await asyncio.Event().wait()


class FailingAbort(FakeDecodeEngine):
    async def abort(self, request_id: str) -> None:
        raise RuntimeError("engine gone")


@pytest.fixture
async def bus(bus_config: BusConfig) -> AsyncIterator[Bus]:
    # one heartbeat per test: a record that changes within it was put by the service itself
    cfg = bus_config.replace(heartbeat_s=30.0, worker_ttl_s=90.0, request_timeout_s=0.2)
    b = await Bus.connect(cfg, "lifecycle-test")
    yield b
    await b.close()


async def test_worker_service_record_carries_role_capacity_and_load(bus: Bus) -> None:
    engine = FakeDecodeEngine(model="m1")
    svc = Role(bus, engine)
    await svc.start()
    try:
        info = await worker_record(bus, "w1")
        assert (info.role, info.model, info.max_slots) == ("prefill", "m1", 3)
        assert (info.active, info.queued, info.free_kv_blocks) == (2, 1, 7)
        assert info.block_size == engine.info.block_size
        assert info.max_model_len == engine.info.max_model_len
        assert info.backends == ["shm"] and not info.draining
    finally:
        svc.finish_drain.set()
        await svc.shutdown()


async def test_worker_service_shutdown_announces_draining_drains_then_stops_everything(bus: Bus) -> None:
    svc = Role(bus, FakeDecodeEngine())
    await svc.start()
    await worker_record(bus, "w1")
    stopping = asyncio.create_task(svc.shutdown())
    await asyncio.wait_for(svc.drain_entered.wait(), 10)
    assert svc.draining_seen is True
    info = await worker_record(bus, "w1", lambda i: i.draining, timeout=5)  # put before the drain
    assert info.draining
    assert svc.background is not None and not svc.background.done()  # nothing cancelled yet
    svc.finish_drain.set()
    await asyncio.wait_for(stopping, 10)
    assert svc.background.cancelled()
    assert len(svc.owner) == 0
    assert await record_gone(bus, "w1")


async def test_worker_service_cancel_reaches_the_role_and_a_bad_cancel_is_ignored(bus: Bus) -> None:
    svc = Role(bus, FakeDecodeEngine())
    await svc.start()
    try:
        await bus.nc.publish(bus.subjects.cancel("t", "junk"), b"not a cancel")
        await bus.publish(bus.subjects.cancel("t", "r0"), Cancel(request_id="r9"))  # names another request
        await bus.publish(bus.subjects.cancel("t", "r1"), Cancel(request_id="r1"))
        # the junk and the mismatch came first, unheard; the role hears the subject's tenant
        assert await asyncio.wait_for(svc.cancels.get(), 10) == ("t", "r1")
        assert svc.cancels.empty()
    finally:
        svc.finish_drain.set()
        await svc.shutdown()


@pytest.mark.parametrize("engine_cls", [StuckAbort, FailingAbort])
async def test_worker_service_abort_is_bounded_and_never_raises(bus: Bus, engine_cls: type) -> None:
    svc = Role(bus, engine_cls())
    await asyncio.wait_for(svc.abort("r1"), 5 * bus.cfg.request_timeout_s)
