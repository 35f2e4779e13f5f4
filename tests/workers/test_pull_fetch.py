"""``fetch_promptly`` against a real nats-server: a waiting pull hands over the first message at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig
from kvrelay.workers.config import DecodeConfig
from kvrelay.workers.pull import consumer_config, fetch_promptly, pull_consumer


@pytest.fixture
async def sub(bus_config: BusConfig) -> AsyncIterator[tuple[Bus, object]]:
    bus = await Bus.connect(bus_config, "test-fetch")
    await bus.ensure_prefilled_stream()
    subj = bus.subjects
    s = await pull_consumer(bus, consumer_config(DecodeConfig(), subj.consumer_decode, subj.prefilled, None))
    yield bus, s
    await s.unsubscribe()
    await bus.close()


async def _waiting_pulls(bus: Bus, n: int, timeout_s: float = 5.0) -> None:
    """Until the server holds ``n`` waiting pull requests on the consumer (bounded)."""
    async def loop() -> None:
        s = bus.subjects
        while (await bus.js.consumer_info(s.stream_prefilled, s.consumer_decode)).num_waiting < n:
            await asyncio.sleep(0.01)  # polling the server's state, bounded by wait_for

    await asyncio.wait_for(loop(), timeout_s)


async def test_fetch_promptly_returns_a_message_as_soon_as_it_arrives(sub) -> None:
    """A pull waiting on an empty queue hands over the first message that comes, well before its
    20 s expiry, although up to 4 were asked for."""
    bus, s = sub
    waiting = asyncio.ensure_future(fetch_promptly(s, 4, 20.0))
    await _waiting_pulls(bus, 1)
    await bus.js.publish(bus.subjects.prefilled, b"x")
    msgs = await asyncio.wait_for(waiting, 5.0)
    assert len(msgs) == 1
    await msgs[0].ack()


async def test_fetch_promptly_times_out_on_an_empty_queue(sub) -> None:
    _, s = sub
    with pytest.raises(asyncio.TimeoutError):
        await fetch_promptly(s, 4, 0.2)


async def test_fetch_promptly_takes_a_waiting_backlog_in_two_fetches(sub) -> None:
    bus, s = sub
    for _ in range(5):
        await bus.js.publish(bus.subjects.prefilled, b"x")
    msgs = await asyncio.wait_for(fetch_promptly(s, 4, 20.0), 5.0)
    assert len(msgs) == 4  # the first, then 3 of the 4 it said were pending
    rest = await asyncio.wait_for(fetch_promptly(s, 4, 20.0), 5.0)
    assert len(rest) == 1
    for m in msgs + rest:
        await m.ack()
