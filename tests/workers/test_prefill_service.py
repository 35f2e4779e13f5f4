"""The prefill worker service against a real nats-server, around the deterministic fake engine."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import msgpack
import pytest
from workers_fake_engines import BLOCK_SIZE, FakePrefillEngine, first_token
from workers_harness import Collector, Service, config, eventually, record_gone, stream_count, task, worker_record

from kvrelay.schemas.codec import unpack
from kvrelay.schemas.messages import Cancel, DispatchReply, LeaseRelease, PrefillDone, TokenChunk
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.transport.errors import BusUnavailable
from kvrelay.workers.errors import EngineDead, EngineError
from kvrelay.workers.prefill import serve


@pytest.fixture
async def bus(bus_config: BusConfig) -> AsyncIterator[Bus]:
    b = await Bus.connect(bus_config, "test-client")
    yield b
    await b.close()


async def start(bus: Bus, bus_config: BusConfig, engine: FakePrefillEngine, **prefill) -> Service:
    svc = Service(serve, config(bus_config, prefill=prefill), engine)
    await worker_record(bus, "p1")  # subscribed and heartbeating
    return svc


async def dispatch(bus: Bus, t) -> DispatchReply:
    return await bus.request(bus.subjects.prefill("p1"), t, DispatchReply)


async def last_done(bus: Bus, subject: str) -> PrefillDone:
    raw = await bus.js.get_last_msg(bus.subjects.stream_prefilled, subject)
    return unpack(raw.data, PrefillDone)


async def test_prefill_dispatch_streams_first_token_then_hands_over_kv(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine()
    svc = await start(bus, bus_config, engine)
    try:
        t = task("r1", list(range(1, 11)), ns=namespace)
        chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
        reply = await dispatch(bus, t)
        assert reply.accepted and reply.code == ""
        first = await chunks.next()
        assert (first.seq, first.token_ids, first.worker) == (0, [first_token(t.prompt_token_ids)], "p1")
        assert first.finish_reason is None and first.error is None and first.text
        await engine.until(lambda: len(engine.leases) == 1)
        done = await last_done(bus, bus.subjects.prefilled)
        ticket = next(iter(engine.leases))
        assert done.request_id == "r1" and done.prefill_worker == "p1"
        assert done.prompt_token_ids == t.prompt_token_ids and done.first_token_id == first.token_ids[0]
        assert done.kv.ticket == ticket and done.kv.num_tokens == 10 and len(done.kv.block_ids) == 3
        assert done.stream_subject == t.stream_subject and done.deadline_ms == t.deadline_ms
        assert done.sampling == t.sampling and done.decode_hint == ""
        assert engine.released == [] and engine.attached == "p1"
    finally:
        await svc.close()


async def test_prefill_decode_hint_goes_to_that_decode_workers_subject(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine()
    svc = await start(bus, bus_config, engine)
    try:
        t = task("r1", [5, 6, 7], ns=namespace, decode_hint="d7")
        chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
        assert (await dispatch(bus, t)).accepted
        await chunks.next()
        await engine.until(lambda: len(engine.leases) == 1)
        done = await last_done(bus, bus.subjects.prefilled_for("d7"))
        assert done.request_id == "r1" and done.decode_hint == "d7"
    finally:
        await svc.close()


async def _count_at_least(bus: Bus, n: int) -> bool:
    return await stream_count(bus) >= n


async def test_prefill_finished_in_prefill_ends_stream_without_handover(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine()
    svc = await start(bus, bus_config, engine)
    try:
        t = task("r1", [1, 2, 3, 4, 5], max_tokens=1, ns=namespace)
        chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
        assert (await dispatch(bus, t)).accepted
        c = await chunks.next()
        assert c.seq == 0 and c.finish_reason == "length" and c.token_ids == [first_token(t.prompt_token_ids)]
        assert c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens) == (5, 1)
        assert engine.leases == {}
        # a later task's handover is the only message: r1 put nothing on the work queue
        t2 = task("r2", [6, 7], ns=namespace)
        assert (await dispatch(bus, t2)).accepted
        await engine.until(lambda: len(engine.leases) == 1)
        # the lease comes before the handover's publish: wait for a message, then it is r2's, alone
        await eventually(lambda: _count_at_least(bus, 1))
        assert (await last_done(bus, bus.subjects.prefilled)).request_id == "r2"
        assert await stream_count(bus) == 1
    finally:
        await svc.close()


async def test_prefill_bad_task_is_rejected_and_worker_keeps_serving(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine()
    svc = await start(bus, bus_config, engine)
    try:
        raw = await bus.nc.request(bus.subjects.prefill("p1"), b"\x93not a kvrelay envelope", timeout=10)
        reply = unpack(raw.data, DispatchReply)
        assert not reply.accepted and reply.code == "invalid" and reply.reason
        body = task("r0", [1], ns=namespace).to_mapping()
        body["stream_subject"] = "bad subject with spaces"
        envelope = msgpack.packb({"t": "PrefillTask", "v": 1, "b": body})  # schema-valid, bad subject
        raw = await bus.nc.request(bus.subjects.prefill("p1"), envelope, timeout=10)
        assert unpack(raw.data, DispatchReply).code == "invalid"

        t = task("r1", [1, 2, 3], ns=namespace)
        chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
        assert (await dispatch(bus, t)).accepted
        assert (await chunks.next()).seq == 0
    finally:
        await svc.close()


async def test_prefill_full_queue_rejects_overloaded(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine()
    engine.gate = asyncio.Event()
    svc = await start(bus, bus_config, engine, max_running=1, max_queued=1)
    try:
        assert (await dispatch(bus, task("a", [1, 2], ns=namespace))).accepted
        await engine.until(lambda: engine.started == ["a"])
        ok = await dispatch(bus, task("b", [1, 2, 3], ns=namespace))
        assert ok.accepted and ok.queued_tokens == 3
        full = await dispatch(bus, task("c", [1], ns=namespace))
        assert not full.accepted and full.code == "overloaded" and full.queued_tokens == 3
        engine.gate.set()
        await engine.until(lambda: engine.started == ["a", "b"])
    finally:
        await svc.close()


async def test_prefill_rejects_when_queued_tokens_or_export_room_run_out(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine(export_blocks=3)
    engine.gate = asyncio.Event()
    svc = await start(bus, bus_config, engine, max_running=1, max_queued_tokens=10)
    try:
        assert (await dispatch(bus, task("a", [1] * 4, ns=namespace))).accepted  # 1 block
        await engine.until(lambda: engine.started == ["a"])
        assert (await dispatch(bus, task("b", [1] * 8, ns=namespace))).accepted  # 2 blocks, 8 tokens
        tokens = await dispatch(bus, task("c", [1] * 3, ns=namespace))
        assert tokens.code == "overloaded" and "tokens" in tokens.reason
        room = await dispatch(bus, task("d", [1, 2], ns=namespace))  # fits the queue, not the region
        assert room.code == "overloaded" and "blocks" in room.reason
        engine.gate.set()
    finally:
        await svc.close()


async def test_prefill_expired_deadline_is_rejected(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine()
    svc = await start(bus, bus_config, engine)
    try:
        reply = await dispatch(bus, task("r1", [1, 2], deadline_s=-1.0, ns=namespace))
        assert not reply.accepted and reply.code == "timeout"
        assert engine.started == []
    finally:
        await svc.close()


async def test_prefill_full_work_queue_ends_stream_with_429_and_frees_kv(nats_url, namespace) -> None:
    bus_config = BusConfig(url=nats_url, namespace=namespace, prefilled=StreamLimits(max_msgs=1))
    bus = await Bus.connect(bus_config, "test-client")
    engine = FakePrefillEngine()
    svc = await start(bus, bus_config, engine)
    try:
        first = task("r1", [1, 2, 3], ns=namespace)
        assert (await dispatch(bus, first)).accepted
        await engine.until(lambda: len(engine.leases) == 1)
        t = task("r2", [4, 5, 6], ns=namespace)
        chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
        assert (await dispatch(bus, t)).accepted
        c0, c1 = await chunks.next(), await chunks.next()
        assert c0.seq == 0 and c0.finish_reason is None
        assert c1.seq == 1 and c1.finish_reason == "error" and c1.error is not None
        assert (c1.error.code, c1.error.status) == ("overloaded", 429)
        await engine.until(lambda: engine.released == [2])
        assert list(engine.leases) == [1] and await stream_count(bus) == 1
    finally:
        await svc.close()
        await bus.close()


async def test_prefill_lease_release_message_frees_the_blocks(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine()
    svc = await start(bus, bus_config, engine)
    try:
        assert (await dispatch(bus, task("r1", [1, 2, 3], ns=namespace))).accepted
        await engine.until(lambda: len(engine.leases) == 1)
        await bus.publish(bus.subjects.kv_release("p1"), b"garbage")  # ignored, not fatal
        await bus.publish(bus.subjects.kv_release("p1"), LeaseRelease(request_id="r1", ticket=1))
        await engine.until(lambda: engine.released == [1] and not engine.leases)
    finally:
        await svc.close()


async def test_prefill_lease_loop_frees_expired_exports(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine(lease_ms=0)
    svc = await start(bus, bus_config, engine)
    try:
        assert (await dispatch(bus, task("r1", [1, 2, 3], ns=namespace))).accepted
        await engine.until(lambda: engine.expired == [1])
        assert engine.leases == {} and engine.released == []
    finally:
        await svc.close()


async def test_prefill_cancel_drops_queued_and_aborts_running(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine()
    engine.gate = asyncio.Event()
    svc = await start(bus, bus_config, engine, max_running=1)
    try:
        a, b = task("a", [1, 2], ns=namespace), task("b", [3, 4], ns=namespace)
        ca = await Collector.open(bus, a.stream_subject, TokenChunk)
        cb = await Collector.open(bus, b.stream_subject, TokenChunk)
        assert (await dispatch(bus, a)).accepted
        await engine.until(lambda: engine.started == ["a"])
        assert (await dispatch(bus, b)).accepted
        await bus.publish(bus.subjects.cancel("t", "b"), Cancel(request_id="b"))
        end_b = await cb.next()
        assert end_b.finish_reason == "abort" and end_b.error is not None and end_b.error.code == "cancelled"
        await bus.publish(bus.subjects.cancel("t", "a"), Cancel(request_id="a"))
        end_a = await ca.next()
        assert end_a.seq == 0 and end_a.finish_reason == "abort" and end_a.error.code == "cancelled"
        assert engine.aborted == ["a"] and engine.started == ["a"]
        assert await stream_count(bus) == 0 and engine.leases == {}
    finally:
        await svc.close()


async def test_prefill_engine_error_ends_request_and_worker_keeps_serving(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine()
    engine.fail["bad"] = EngineError("injected")
    svc = await start(bus, bus_config, engine)
    try:
        bad, good = task("bad", [1, 2], ns=namespace), task("good", [3, 4], ns=namespace)
        cbad = await Collector.open(bus, bad.stream_subject, TokenChunk)
        cgood = await Collector.open(bus, good.stream_subject, TokenChunk)
        assert (await dispatch(bus, bad)).accepted
        err = await cbad.next()
        assert err.finish_reason == "error" and (err.error.code, err.error.status) == ("engine", 500)
        assert (await dispatch(bus, good)).accepted
        assert (await cgood.next()).token_ids == [first_token([3, 4])]
    finally:
        await svc.close()


async def test_prefill_heartbeat_record_shows_live_counts(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine(export_blocks=50)
    engine.gate = asyncio.Event()
    svc = await start(bus, bus_config, engine, max_running=1)
    try:
        assert (await dispatch(bus, task("a", [1, 2], ns=namespace))).accepted
        await engine.until(lambda: engine.started == ["a"])
        assert (await dispatch(bus, task("b", [1] * 7, ns=namespace))).accepted
        info = await worker_record(bus, "p1", lambda i: i.active == 1 and i.queued == 1)
        assert (info.role, info.model, info.hash_seed) == ("prefill", "fake", "seed")
        assert info.block_size == BLOCK_SIZE
        assert info.max_slots == 1 and info.queued_tokens == 7 and info.free_kv_blocks == 50
        assert not info.draining and info.backends == ["shm"]
        engine.gate.set()
        info = await worker_record(bus, "p1", lambda i: i.active == 0 and i.queued == 0)
        assert info.free_kv_blocks == 50 - 1 - 2
    finally:
        await svc.close()


async def test_prefill_clean_stop_leaves_no_tasks(bus_config, namespace) -> None:
    baseline = asyncio.all_tasks()
    bus = await Bus.connect(bus_config, "test-client")
    engine = FakePrefillEngine()
    engine.gate = asyncio.Event()  # never opened: the running task outlives the drain period
    svc = await start(bus, bus_config, engine, drain_timeout_s=0.2)
    t = task("r1", [1, 2], ns=namespace)
    chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
    assert (await dispatch(bus, t)).accepted
    await engine.until(lambda: engine.started == ["r1"])
    await svc.close()
    end = await chunks.next()
    assert end.finish_reason == "error" and end.error.code == "draining" and end.error.status == 503
    assert engine.aborted == ["r1"] and engine.is_stopped
    assert await record_gone(bus, "p1")
    await bus.close()
    assert asyncio.all_tasks() == baseline


async def test_prefill_metrics_are_served_over_http(bus, bus_config, namespace) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = FakePrefillEngine()
    svc = await start(bus, bus_config, engine, metrics_port=port)
    try:
        t = task("r1", [1, 2, 3], ns=namespace)
        chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
        assert (await dispatch(bus, t)).accepted
        await chunks.next()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(5)) as resp:
                assert resp.status == 200
                text = await resp.text()
        assert 'kvrelay_prefill_requests_total{outcome="accepted"}' in text
        assert "kvrelay_prefill_seconds_bucket" in text and "kvrelay_decode_active" in text
    finally:
        await svc.close()


async def test_prefill_engine_death_stops_the_worker_with_engine_dead(bus, bus_config, namespace) -> None:
    engine = FakePrefillEngine()
    engine.fail["r1"] = EngineDead("gone")
    svc = await start(bus, bus_config, engine)
    t = task("r1", [1, 2], ns=namespace)
    chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
    assert (await dispatch(bus, t)).accepted
    assert (await chunks.next()).error.code == "engine"
    with pytest.raises(EngineDead):
        await asyncio.wait_for(svc.task, 15)
    assert engine.is_stopped and await record_gone(bus, "p1")


async def test_prefill_serve_without_nats_is_unavailable(namespace) -> None:
    cfg = config(BusConfig(url="nats://127.0.0.1:1", namespace=namespace, connect_timeout_s=0.2))
    engine = FakePrefillEngine()
    with pytest.raises(BusUnavailable):
        await serve(cfg, asyncio.Event(), engine)
    assert not engine.is_started
