"""The decode worker service against a real nats-server, around the deterministic fake engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from workers_fake_engines import FakeDecodeEngine, FakePrefillEngine, decode_tokens, first_token
from workers_harness import (
    Collector,
    Service,
    config,
    consumer_state,
    eventually,
    prefill_done,
    record_gone,
    stream_count,
    task,
    worker_record,
)

from kvrelay.schemas.codec import unpack
from kvrelay.schemas.messages import Cancel, DispatchReply, LeaseRelease, PrefillDone, TokenChunk
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig
from kvrelay.workers import decode as decode_worker
from kvrelay.workers import prefill as prefill_worker


async def stream_empty(bus: Bus, durable: str) -> bool:
    return await stream_count(bus) == 0 and await consumer_state(bus, durable) == (0, 0)


@pytest.fixture
async def bus(bus_config: BusConfig) -> AsyncIterator[Bus]:
    b = await Bus.connect(bus_config, "test-client")
    await b.ensure_prefilled_stream()
    yield b
    await b.close()


async def start_decode(bus: Bus, bus_config: BusConfig, engine: FakeDecodeEngine, **settings) -> Service:
    svc = Service(decode_worker.serve, config(bus_config, decode=settings), engine)
    await worker_record(bus, "d1")  # consumers bound, pulling and heartbeating
    return svc


async def test_decode_full_flow_streams_tokens_and_releases_lease_once(bus, bus_config, namespace) -> None:
    pengine, dengine = FakePrefillEngine(), FakeDecodeEngine()
    prefill = Service(prefill_worker.serve, config(bus_config), pengine)
    await worker_record(bus, "p1")
    svc = await start_decode(bus, bus_config, dengine)
    releases = await Collector.open(bus, bus.subjects.kv_release("p1"), LeaseRelease)
    try:
        for n, rid in enumerate(("r1", "r2"), start=1):
            t = task(rid, [3, 1, 4, 1, 5, 9], max_tokens=5, ns=namespace)
            chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
            assert (await bus.request(bus.subjects.prefill("p1"), t, DispatchReply)).accepted
            out = await chunks.until_final()
            first = first_token(t.prompt_token_ids)
            assert [c.seq for c in out] == [0, 1, 2, 3, 4]
            assert [tok for c in out for tok in c.token_ids] == [first, *decode_tokens(first, 4)]
            assert [c.worker for c in out] == ["p1", "d1", "d1", "d1", "d1"]
            last = out[-1]
            assert last.finish_reason == "length" and last.error is None
            u = last.usage
            assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (6, 5, 0)
            rel = await releases.next()
            assert (rel.request_id, rel.ticket) == (rid, n)
            await pengine.until(lambda n=n: pengine.released == list(range(1, n + 1)))
        # r1's release came before anything of r2 from the same connection: a second one would show here
        assert releases.drained() == [] and pengine.leases == {}
        await eventually(lambda: stream_empty(bus, "decode"))
    finally:
        await svc.close()
        await prefill.close()


async def test_decode_counts_kv_bytes_when_the_import_is_in_not_at_a_heartbeat(bus, bus_config,
                                                                              namespace) -> None:
    """``kvrelay_kv_bytes_moved_total`` includes a request's transfer once its tokens flow; the
    decode worker's heartbeats (2.5 s apart here) are not what brings it up to date."""
    from prometheus_client import REGISTRY

    def moved() -> float:
        return REGISTRY.get_sample_value("kvrelay_kv_bytes_moved_total") or 0.0

    pengine, dengine = FakePrefillEngine(), FakeDecodeEngine()
    prefill = Service(prefill_worker.serve, config(bus_config), pengine)
    await worker_record(bus, "p1")
    svc = Service(decode_worker.serve, config(bus_config, heartbeat_s=2.5, worker_ttl_s=10.0), dengine)
    await worker_record(bus, "d1")
    try:
        before = moved()
        t = task("kvb1", [3, 1, 4, 1, 5, 9, 2, 6], max_tokens=3, ns=namespace)
        chunks = await Collector.open(bus, t.stream_subject, TokenChunk)
        assert (await bus.request(bus.subjects.prefill("p1"), t, DispatchReply)).accepted
        await chunks.until_final()
        assert moved() - before == 8 * 64  # the fake engine moves 64 bytes a prompt token
    finally:
        await svc.close()
        await prefill.close()


async def test_decode_pulls_no_more_than_max_slots(bus, bus_config, namespace) -> None:
    engine = FakeDecodeEngine()
    engine.import_gate = asyncio.Event()
    svc = await start_decode(bus, bus_config, engine, max_slots=2, fetch_batch=4)
    try:
        for i in range(4):
            d = prefill_done(f"r{i}", [i + 1, 2], ns=namespace, ticket=i + 1)
            await bus.js_publish(bus.subjects.prefilled, d)
        await engine.until(lambda: len(engine.started) == 2)
        info = await worker_record(bus, "d1", lambda i: i.active == 2)
        assert info.max_slots == 2
        assert await consumer_state(bus, "decode") == (2, 2)  # two waiting in the stream, two taken
        assert len(engine.started) == 2
        engine.import_gate.set()
        await engine.until(lambda: len(engine.finished) == 4)
        assert sorted(engine.started) == ["r0", "r1", "r2", "r3"]
    finally:
        await svc.close()


async def test_decode_undecodable_message_is_terminated_and_worker_goes_on(bus, bus_config,
                                                                          namespace) -> None:
    engine = FakeDecodeEngine()
    svc = await start_decode(bus, bus_config, engine)
    try:
        await bus.js_publish(bus.subjects.prefilled, b"\x00 not a PrefillDone")
        d = prefill_done("r1", [1, 2, 3], max_tokens=3, ns=namespace)
        chunks = await Collector.open(bus, d.stream_subject, TokenChunk)
        await bus.js_publish(bus.subjects.prefilled, d)
        out = await chunks.until_final()
        assert [c.seq for c in out] == [1, 2] and out[-1].finish_reason == "length"
        assert engine.started == ["r1"]
        await eventually(lambda: stream_empty(bus, "decode"))  # the bad message was terminated
    finally:
        await svc.close()


async def test_decode_engine_error_ends_stream_and_still_releases_lease(bus, bus_config, namespace) -> None:
    engine = FakeDecodeEngine()
    engine.fail_after = {"mid": 1, "early": 0}
    svc = await start_decode(bus, bus_config, engine)
    releases = await Collector.open(bus, bus.subjects.kv_release("p1"), LeaseRelease)
    try:
        mid = prefill_done("mid", [1, 2, 3], max_tokens=6, ns=namespace, ticket=7)
        chunks = await Collector.open(bus, mid.stream_subject, TokenChunk)
        await bus.js_publish(bus.subjects.prefilled, mid)
        out = await chunks.until_final()
        assert [c.seq for c in out] == [1, 2] and out[0].token_ids == decode_tokens(mid.first_token_id, 1)
        end = out[-1]
        assert end.finish_reason == "error" and (end.error.code, end.error.status) == ("engine", 500)
        rel = await releases.next()
        assert (rel.request_id, rel.ticket) == ("mid", 7)

        early = prefill_done("early", [4, 5], max_tokens=6, ns=namespace, ticket=8)
        chunks = await Collector.open(bus, early.stream_subject, TokenChunk)
        await bus.js_publish(bus.subjects.prefilled, early)
        (err,) = await chunks.until_final()
        assert err.seq == 1 and err.error.code == "engine"
        rel = await releases.next()
        assert (rel.request_id, rel.ticket) == ("early", 8)
        await eventually(lambda: stream_empty(bus, "decode"))
    finally:
        await svc.close()


async def test_decode_expired_prefilldone_is_dropped_with_timeout(bus, bus_config, namespace) -> None:
    engine = FakeDecodeEngine()
    svc = await start_decode(bus, bus_config, engine)
    releases = await Collector.open(bus, bus.subjects.kv_release("p1"), LeaseRelease)
    try:
        d = prefill_done("late", [1, 2], ns=namespace, deadline_s=-1.0, ticket=3)
        chunks = await Collector.open(bus, d.stream_subject, TokenChunk)
        await bus.js_publish(bus.subjects.prefilled, d)
        (err,) = await chunks.until_final()
        assert err.seq == 1 and (err.error.code, err.error.status) == ("timeout", 504)
        assert (await releases.next()).ticket == 3
        assert engine.started == []
        await eventually(lambda: stream_empty(bus, "decode"))
    finally:
        await svc.close()


async def test_decode_cancel_aborts_a_running_request(bus, bus_config, namespace) -> None:
    engine = FakeDecodeEngine()
    engine.hold_at = 2  # two tokens out, then wait
    svc = await start_decode(bus, bus_config, engine)
    try:
        d = prefill_done("r1", [1, 2], max_tokens=8, ns=namespace)
        chunks = await Collector.open(bus, d.stream_subject, TokenChunk)
        await bus.js_publish(bus.subjects.prefilled, d)
        assert [(await chunks.next()).seq for _ in range(2)] == [1, 2]
        await bus.publish(bus.subjects.cancel("t", "r1"), Cancel(request_id="r1"))
        end = await chunks.next()
        assert end.seq == 3 and end.finish_reason == "abort"
        assert end.usage is not None and end.usage.completion_tokens == 3
        assert engine.aborted == ["r1"]
        await engine.until(lambda: engine.running == set())
    finally:
        await svc.close()


async def test_decode_affinity_subject_reaches_this_worker(bus, bus_config, namespace) -> None:
    engine = FakeDecodeEngine()
    svc = await start_decode(bus, bus_config, engine)
    try:
        d = prefill_done("r1", [1, 2], max_tokens=2, ns=namespace)
        chunks = await Collector.open(bus, d.stream_subject, TokenChunk)
        await bus.js_publish(bus.subjects.prefilled_for("d1"), d)
        out = await chunks.until_final()
        assert [c.worker for c in out] == ["d1"] and out[-1].finish_reason == "length"
        await eventually(lambda: stream_empty(bus, "decode_d1"))
    finally:
        await svc.close()


async def test_decode_heartbeat_record_shows_live_counts(bus, bus_config, namespace) -> None:
    engine = FakeDecodeEngine(free_kv_blocks=77)
    engine.import_gate = asyncio.Event()
    svc = await start_decode(bus, bus_config, engine, max_slots=3)
    try:
        for i in range(2):
            d = prefill_done(f"r{i}", [1, 2], ns=namespace, ticket=i + 1)
            await bus.js_publish(bus.subjects.prefilled, d)
        info = await worker_record(bus, "d1", lambda i: i.active == 2)
        assert (info.role, info.max_slots, info.free_kv_blocks, info.draining) == ("decode", 3, 77, False)
        engine.import_gate.set()
        await worker_record(bus, "d1", lambda i: i.active == 0)
    finally:
        await svc.close()


async def test_decode_clean_stop_returns_unstarted_work_and_leaves_no_tasks(bus_config, namespace) -> None:
    baseline = asyncio.all_tasks()
    bus = await Bus.connect(bus_config, "test-client")
    await bus.ensure_prefilled_stream()
    engine = FakeDecodeEngine()
    engine.import_gate = asyncio.Event()  # never opened: the KV import never finishes
    svc = await start_decode(bus, bus_config, engine, drain_timeout_s=0.2)
    releases = await Collector.open(bus, bus.subjects.kv_release("p1"), LeaseRelease)
    d = prefill_done("r1", [1, 2], ns=namespace)
    chunks = await Collector.open(bus, d.stream_subject, TokenChunk)
    await bus.js_publish(bus.subjects.prefilled, d)
    await engine.until(lambda: engine.started == ["r1"])
    await svc.close()
    assert engine.is_stopped and engine.closed == ["r1"]
    # not started: nak'ed back to the queue, so another decode worker gets it now (not after ack_wait)
    other = await bus.js.pull_subscribe_bind(durable="decode", stream=bus.subjects.stream_prefilled)
    (again,) = await other.fetch(1, timeout=5)
    assert unpack(again.data, PrefillDone).request_id == "r1" and again.metadata.num_delivered == 2
    assert chunks.drained() == [] and releases.drained() == []  # lease kept, client told nothing
    assert await record_gone(bus, "d1")
    await bus.close()
    assert asyncio.all_tasks() == baseline


async def test_decode_stop_during_streaming_ends_the_stream(bus, bus_config, namespace) -> None:
    engine = FakeDecodeEngine()
    engine.hold_at = 1
    svc = await start_decode(bus, bus_config, engine, drain_timeout_s=0.1)
    releases = await Collector.open(bus, bus.subjects.kv_release("p1"), LeaseRelease)
    d = prefill_done("r1", [1, 2], max_tokens=8, ns=namespace)
    chunks = await Collector.open(bus, d.stream_subject, TokenChunk)
    await bus.js_publish(bus.subjects.prefilled, d)
    assert (await chunks.next()).seq == 1
    await svc.close()
    end = await chunks.next()
    assert end.seq == 2 and end.finish_reason == "error" and end.error.code == "draining"
    assert (await releases.next()).request_id == "r1" and engine.aborted == ["r1"]
    await eventually(lambda: stream_empty(bus, "decode"))
    engine.hold.set()
