"""The bus against a real nats-server: bounded streams, push back when full, typed errors."""

from __future__ import annotations

import pytest

from kvrelay.schemas import Cancel, DispatchReply, unpack
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.transport.errors import Backpressure, BusTimeout, BusUnavailable


async def test_bus_streams_are_created_with_their_bounds(bus_config: BusConfig) -> None:
    bus = await Bus.connect(bus_config, "test")
    try:
        await bus.ensure_prefilled_stream()
        await bus.ensure_request_stream()
        await bus.ensure_kv_events_stream()
        info = await bus.js.stream_info(bus.subjects.stream_prefilled)
        assert info.config.max_msgs == bus_config.prefilled.max_msgs
        assert info.config.max_bytes == bus_config.prefilled.max_bytes
        assert info.config.max_age == pytest.approx(bus_config.prefilled.max_age_s)
        assert str(getattr(info.config.discard, "value", info.config.discard)) == "new"
        ev = await bus.js.stream_info(bus.subjects.stream_kv_events)
        assert str(getattr(ev.config.discard, "value", ev.config.discard)) == "old"
    finally:
        await bus.close()


async def test_bus_full_work_queue_pushes_back(nats_url: str, namespace: str) -> None:
    cfg = BusConfig(url=nats_url, namespace=namespace, prefilled=StreamLimits(max_msgs=2))
    bus = await Bus.connect(cfg, "test")
    try:
        await bus.ensure_prefilled_stream()
        msg = Cancel(request_id="r1")
        await bus.js_publish(bus.subjects.prefilled, msg)
        await bus.js_publish(bus.subjects.prefilled, msg)
        with pytest.raises(Backpressure):
            await bus.js_publish(bus.subjects.prefilled, msg)
    finally:
        await bus.close()


async def test_bus_ensure_stream_applies_new_bounds_to_an_existing_stream(nats_url: str, namespace: str) -> None:
    bus = await Bus.connect(BusConfig(url=nats_url, namespace=namespace), "test")
    try:
        await bus.ensure_prefilled_stream()
        bus.cfg = BusConfig(url=nats_url, namespace=namespace, prefilled=StreamLimits(max_msgs=7))
        await bus.ensure_prefilled_stream()
        info = await bus.js.stream_info(bus.subjects.stream_prefilled)
        assert info.config.max_msgs == 7
    finally:
        await bus.close()


async def test_bus_request_without_responder_is_unavailable(bus_config: BusConfig) -> None:
    bus = await Bus.connect(bus_config, "test")
    try:
        with pytest.raises(BusUnavailable):
            await bus.request(bus.subjects.prefill("nobody"), Cancel(request_id="x"), DispatchReply, timeout=1)
    finally:
        await bus.close()


async def test_bus_request_roundtrip_and_timeout(bus_config: BusConfig) -> None:
    bus = await Bus.connect(bus_config, "test")
    try:
        async def answer(msg):  # replies once, then goes silent
            unpack(msg.data, Cancel)
            await bus.respond(msg, DispatchReply(accepted=True, queued_tokens=3))

        sub = await bus.subscribe(bus.subjects.prefill("w1"), answer)
        reply = await bus.request(bus.subjects.prefill("w1"), Cancel(request_id="x"), DispatchReply)
        assert reply.accepted and reply.queued_tokens == 3
        await sub.unsubscribe()

        async def silent(msg):
            return None

        await bus.subscribe(bus.subjects.prefill("w2"), silent)
        with pytest.raises(BusTimeout):
            await bus.request(bus.subjects.prefill("w2"), Cancel(request_id="x"), DispatchReply, timeout=0.2)
    finally:
        await bus.close()


async def test_bus_connect_to_nothing_is_unavailable(namespace: str) -> None:
    cfg = BusConfig(url="nats://127.0.0.1:1", namespace=namespace, connect_timeout_s=0.5)
    with pytest.raises(BusUnavailable):
        await Bus.connect(cfg, "test")
