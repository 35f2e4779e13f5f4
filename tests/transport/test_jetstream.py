"""The bus's stream consumers and buckets against a real nats-server: pull consumers and their
deliveries, the ordered stream consumer, key-value buckets; every failure a transport error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from kvrelay.schemas import Cancel, unpack
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig
from kvrelay.transport.errors import BusUnavailable, TransportError
from kvrelay.transport.jetstream import ConsumerSpec


@pytest.fixture
async def bus(bus_config: BusConfig) -> AsyncIterator[Bus]:
    b = await Bus.connect(bus_config, "test-jetstream")
    await b.ensure_prefilled_stream()
    yield b
    await b.close()


def _spec(bus: Bus, **kw) -> ConsumerSpec:  # noqa: ANN003 - ConsumerSpec fields
    s = bus.subjects
    return ConsumerSpec(**{"durable": s.consumer_decode, "filter_subject": s.prefilled, "ack_wait_s": 30.0, **kw})


async def _fetch_all(sub, n: int) -> list:  # noqa: ANN001 - PullConsumer
    msgs: list = []
    while len(msgs) < n:
        msgs += await sub.fetch(n - len(msgs), 5.0)
    return msgs


async def test_pull_consumer_fetch_finds_nothing_on_an_empty_queue(bus: Bus) -> None:
    sub = await bus.pull_consumer(bus.subjects.stream_prefilled, _spec(bus))
    assert await sub.fetch(4, 0.2) == []


async def test_pull_consumer_delivers_with_stream_metadata_and_settles(bus: Bus) -> None:
    s = bus.subjects
    sub = await bus.pull_consumer(s.stream_prefilled, _spec(bus))
    before = int(time.time() * 1000)
    for i in range(3):
        await bus.js_publish(s.prefilled, Cancel(request_id=f"r{i}"))
    msgs = await sub.fetch(1, 5.0)
    assert len(msgs) == 1 and msgs[0].subject == s.prefilled
    assert msgs[0].num_pending() == 2
    assert before - 1000 <= msgs[0].timestamp_ms() <= int(time.time() * 1000) + 1000
    await msgs[0].nak()  # back to the queue at once: the next fetches get all three
    msgs = await asyncio.wait_for(_fetch_all(sub, 3), 10.0)
    assert sorted(unpack(m.data, Cancel).request_id for m in msgs) == ["r0", "r1", "r2"]
    await msgs[0].in_progress()
    await msgs[0].ack()
    await msgs[1].term()
    await msgs[2].ack()
    assert await sub.fetch(3, 0.2) == []
    await sub.unsubscribe()


async def test_pull_consumer_update_applies_new_settings_to_an_existing_consumer(bus: Bus) -> None:
    s = bus.subjects
    await bus.pull_consumer(s.stream_prefilled, _spec(bus, ack_wait_s=30.0))
    await bus.pull_consumer(s.stream_prefilled, _spec(bus, ack_wait_s=45.0), update=False)
    assert (await bus.js.consumer_info(s.stream_prefilled, s.consumer_decode)).config.ack_wait == 30.0
    await bus.pull_consumer(s.stream_prefilled, _spec(bus, ack_wait_s=60.0))
    assert (await bus.js.consumer_info(s.stream_prefilled, s.consumer_decode)).config.ack_wait == 60.0


async def test_pull_consumer_refused_update_uses_the_existing_consumer(bus: Bus) -> None:
    s = bus.subjects
    await bus.pull_consumer(s.stream_prefilled, _spec(bus, max_waiting=512))
    sub = await bus.pull_consumer(s.stream_prefilled, _spec(bus, max_waiting=256))  # cannot change
    assert (await bus.js.consumer_info(s.stream_prefilled, s.consumer_decode)).config.max_waiting == 512
    await bus.js_publish(s.prefilled, Cancel(request_id="r"))
    assert len(await sub.fetch(1, 5.0)) == 1


async def test_pull_consumer_on_a_missing_stream_is_unavailable(bus: Bus) -> None:
    with pytest.raises(BusUnavailable):
        await bus.pull_consumer("NO_SUCH_STREAM", _spec(bus), update=False)


async def test_pull_consumer_fetch_and_settle_on_a_closed_bus_raise_transport_errors(bus_config: BusConfig) -> None:
    b = await Bus.connect(bus_config, "test-closed")
    await b.ensure_prefilled_stream()
    sub = await b.pull_consumer(b.subjects.stream_prefilled, _spec(b))
    await b.js_publish(b.subjects.prefilled, Cancel(request_id="r"))
    (msg,) = await sub.fetch(1, 5.0)
    await b.close()
    with pytest.raises(TransportError):
        await sub.fetch(1, 0.2)
    with pytest.raises(TransportError):
        await msg.ack()
    with pytest.raises(TransportError):
        await sub.unsubscribe()


async def test_subscribe_stream_replays_what_the_stream_holds_then_follows(bus: Bus) -> None:
    s = bus.subjects
    await bus.ensure_kv_events_stream()
    await bus.js_publish(s.kv_events("w1"), Cancel(request_id="a"))
    await bus.js_publish(s.kv_events("w2"), Cancel(request_id="b"))
    got: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)

    async def on(msg) -> None:  # noqa: ANN001 - nats Msg
        got.put_nowait(msg.data)

    sub = await bus.subscribe_stream(s.kv_events_all, s.stream_kv_events, on)
    await bus.js_publish(s.kv_events("w1"), Cancel(request_id="c"))
    seen = [unpack(await asyncio.wait_for(got.get(), 5.0), Cancel).request_id for _ in range(3)]
    assert seen == ["a", "b", "c"]
    await bus.unsubscribe(sub)


async def test_unsubscribe_on_a_closed_bus_is_unavailable(bus_config: BusConfig) -> None:
    b = await Bus.connect(bus_config, "test-unsub")

    async def on(msg) -> None:  # noqa: ANN001 - nats Msg
        pass

    sub = await b.subscribe(b.new_inbox(), on)
    await b.close()
    with pytest.raises(BusUnavailable):
        await b.unsubscribe(sub)


async def test_key_value_is_created_once_and_reused_with_its_first_settings(bus: Bus) -> None:
    name = bus.subjects.bucket_workers
    kv = await bus.key_value(name, 5.0, 1 << 20)
    await kv.put("w1", b"one")
    again = await bus.key_value(name, 60.0, 1 << 20)
    assert (await again.get("w1")).value == b"one"
    assert (await again.status()).ttl == pytest.approx(5.0)


async def test_new_inbox_is_unique(bus: Bus) -> None:
    assert bus.new_inbox() != bus.new_inbox()
