"""The flight watch: a stream whose worker is gone, or that went silent, ends with one clear error
(pure verdicts, then the router over HTTP against a real nats-server and fake workers)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import TYPE_CHECKING

import aiohttp
import pytest

from kvrelay.router.errors import StreamStalled, WorkerLost
from kvrelay.router.watch import FlightWatch, Watched, verdict

if TYPE_CHECKING:
    from conftest import Cluster

LIVE = {"p0": 1, "d0": 1}  # worker -> the started_ms of its live record


def _w(**kw) -> Watched:
    base = dict(worker="p0", local=False, stream_worker="", finished=False, last_heard=0.0)
    return Watched(**{**base, **kw})


@pytest.mark.parametrize(("state", "live", "now", "expected"), [
    (_w(worker=""), {}, 100.0, None),  # not dispatched yet
    (_w(), LIVE, 100.0, None),  # prefilling on a live worker
    (_w(), {"d0": 1}, 100.0, WorkerLost),  # its prefill worker left before the first token
    (_w(last_heard=1.0), {"d0": 1}, 100.0, None),  # handed over: waiting for a decode slot
    (_w(stream_worker="d0", last_heard=99.0), LIVE, 100.0, None),  # decoding
    (_w(stream_worker="d0", last_heard=98.0), {"p0": 1}, 100.0, WorkerLost),  # decode gone
    (_w(stream_worker="d0", last_heard=99.5), {"p0": 1}, 100.0, None),  # heard 0.5 s ago
    (_w(stream_worker="d0", last_heard=98.0, started_ms={"d0": 1}), {"d0": 2}, 100.0,
     WorkerLost),  # restarted under the same id
    (_w(stream_worker="d0", last_heard=60.0), LIVE, 100.0, StreamStalled),  # silent
    (_w(worker="d0", local=True), {"p0": 1}, 100.0, WorkerLost),  # local prefill: its decode worker gone
    (_w(worker="d0", local=True, last_heard=50.0), LIVE, 100.0, StreamStalled),
    (_w(stream_worker="d0", finished=True, last_heard=1.0), {}, 100.0, None),  # done
])
def test_watch_verdict(state: Watched, live: dict, now: float, expected: type | None) -> None:
    error = verdict(state, live, stall_s=30.0, now=now)
    assert (error is None) if expected is None else isinstance(error, expected)


def test_watch_verdict_names_the_worker_and_the_stall() -> None:
    lost = verdict(_w(stream_worker="d7", last_heard=1.0), LIVE, 30.0, 3.0)
    assert lost.code == "worker_lost" and lost.status == 503 and "d7" in lost.message
    stalled = verdict(_w(stream_worker="d0", last_heard=1.0), LIVE, 30.0, 41.0)
    assert stalled.code == "stream_stalled" and stalled.status == 504 and "40.0 s" in stalled.message


async def _stream_events(url: str, body: dict) -> list:
    events = []
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        async for line in r.content:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


BODY = {"model": "kvrelay-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
        "stream": True}


def _lost(router, reason: str) -> float:
    return router.metrics.registry.get_sample_value("kvrelay_router_streams_lost_total", {"reason": reason}) or 0


async def test_watch_decode_worker_gone_mid_stream_ends_it_with_one_worker_lost_error(cluster: Cluster) -> None:
    router = await cluster.router(watch_interval_s=0.05)
    await cluster.worker("p0", "handover_then_stall", tokens=8, decoder="d0")
    decode = await cluster.worker("d0", role="decode")
    await cluster.seen(router, 1, 1)
    reading = asyncio.create_task(_stream_events(router.url, BODY))
    await cluster.wait_until(lambda: any(f.stream_worker == "d0" for f in router.dispatcher.flights.values()),
                             what="the decode worker's chunk")
    await decode.stop()  # its discovery record is deleted: the router sees it leave
    events = await asyncio.wait_for(reading, 30)
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "worker_lost" and "d0" in errors[0]["error"]["message"]
    assert events[-1] == "[DONE]"
    assert _lost(router, "worker_lost") == 1 and not router.dispatcher.flights


async def test_watch_a_silent_stream_ends_with_stream_stalled(cluster: Cluster) -> None:
    router = await cluster.router(watch_interval_s=0.05, stream_stall_timeout_s=0.5)
    await cluster.worker("p0", "handover_then_stall", tokens=8, decoder="d0")
    await cluster.worker("d0", role="decode")
    await cluster.seen(router, 1, 1)
    events = await _stream_events(router.url, BODY)
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "stream_stalled", events
    assert _lost(router, "stream_stalled") == 1


async def test_watch_prefill_worker_gone_before_the_first_token_is_worker_lost(cluster: Cluster) -> None:
    router = await cluster.router(watch_interval_s=0.05)
    prefill = await cluster.worker("p0", "stall")
    await cluster.worker("d0", role="decode")
    await cluster.seen(router, 1, 1)
    status: list = []

    async def post() -> None:
        async with aiohttp.ClientSession() as s, s.post(router.url + "/v1/chat/completions",
                                                        json=BODY | {"stream": False}) as r:
            status.append((r.status, await r.json()))

    task = asyncio.create_task(post())
    await asyncio.wait_for(prefill.got_task.wait(), 10)
    await prefill.stop()
    await asyncio.wait_for(task, 30)
    code, body = status[0]
    assert code == 503 and body["error"]["code"] == "worker_lost"


def test_watch_a_late_pass_judges_nothing() -> None:
    stalled = _w(stream_worker="d0", last_heard=1.0)
    lost: list = []
    flight = SimpleNamespace(request_id="r", watched=lambda: stalled, lost=lost.append)
    counter = SimpleNamespace(inc=lambda: None)
    dispatcher = SimpleNamespace(flights={"r": flight}, directory=SimpleNamespace(live=lambda: []),
                                 metrics=SimpleNamespace(streams_lost=SimpleNamespace(labels=lambda r: counter)))
    watch = FlightWatch(dispatcher, interval_s=0.5, stall_s=30.0)
    assert watch.check(now=100.0) == 1  # the first pass judges
    assert watch.check(now=105.0) == 0  # 5 s later: this router was blocked, heartbeats may be unread
    assert watch.check(now=105.5) == 1 and len(lost) == 2
