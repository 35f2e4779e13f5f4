"""The NATS intake against a real nats-server and fake workers: pub/sub clients' requests."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import msgpack
import pytest

from kvrelay.schemas.codec import unpack
from kvrelay.schemas.messages import Cancel, ChatMessage, ClientRequest, SamplingSpec, TokenChunk
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import StreamLimits
from kvrelay.transport.errors import Backpressure

if TYPE_CHECKING:
    from conftest import Cluster


class Client:
    """A pub/sub client: publishes requests, collects the chunks on its own subject."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.subject = f"client.{uuid.uuid4().hex}.out"
        self.chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def start(self) -> Client:
        await self.bus.subscribe(self.subject, self._on)
        return self

    async def _on(self, msg) -> None:
        await self.chunks.put(unpack(msg.data, TokenChunk))

    def request(self, **kw) -> ClientRequest:
        fields = {"request_id": uuid.uuid4().hex, "stream_subject": self.subject,
                  "messages": [ChatMessage(role="user", content="Hello there")],
                  "sampling": SamplingSpec(max_tokens=4)} | kw
        return ClientRequest(**fields)

    async def send(self, req: ClientRequest | bytes, tenant: str = "acme") -> None:
        await self.bus.js_publish(self.bus.subjects.request(tenant), req)

    async def until_final(self, timeout: float = 10.0) -> list[TokenChunk]:
        out: list[TokenChunk] = []
        while not out or out[-1].finish_reason is None:
            out.append(await asyncio.wait_for(self.chunks.get(), timeout))
        return out


async def _setup(cluster: Cluster, mode: str = "ok", workers: int = 1, bus_config=None, **router_cfg):
    router = await cluster.router(bus_config=bus_config, **router_cfg)
    ws = [await cluster.worker(f"p{i}", mode) for i in range(workers)]
    if workers:
        await cluster.seen(router, workers)
    await asyncio.wait_for(router.intake.ready.wait(), 10)
    client = await Client(await cluster.bus()).start()
    return router, ws, client


async def _stream_messages(bus: Bus) -> int:
    return (await bus.js.stream_info(bus.subjects.stream_requests)).state.messages


async def _drained(bus: Bus, timeout: float = 10.0) -> None:
    """Wait until the work queue holds no message (acks and terms reach the server asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (left := await _stream_messages(bus)) != 0:  # each check is a round trip to the server
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{left} requests still in the stream after {timeout} s")


@pytest.mark.parametrize("form", ["messages", "prompt", "prompt_token_ids"])
async def test_intake_valid_request_streams_to_its_subject(cluster: Cluster, form: str) -> None:
    router, (worker,), client = await _setup(cluster)
    extra = {"messages": {}, "prompt": {"messages": None, "prompt": "Once upon a time"},
             "prompt_token_ids": {"messages": None, "prompt_token_ids": [9, 8, 7, 6]}}[form]
    req = client.request(**extra)
    await client.send(req)
    chunks = await client.until_final()
    assert [c.seq for c in chunks] == [0, 1, 2, 3] and chunks[-1].finish_reason == "length"
    task = worker.tasks[0]
    assert (task.request_id, task.tenant, task.stream_subject) == (req.request_id, "acme", client.subject)
    expected = {"messages": lambda: cluster.tokenizer.encode_chat_sync([{"role": "user", "content": "Hello there"}]),
                "prompt": lambda: cluster.tokenizer.encode_prompt_sync("Once upon a time"),
                "prompt_token_ids": lambda: [9, 8, 7, 6]}[form]()
    assert task.prompt_token_ids == expected
    assert chunks[0].text == f"[{len(expected)}]"
    await cluster.wait_until(lambda: router.metrics.requests.labels("nats", "ok")._value.get() == 1,
                             what="the router saw the request finish")
    assert len(router.dispatcher.table) == 0
    await _drained(client.bus)  # acknowledged: gone from the work queue


async def test_intake_invalid_request_gets_an_error_chunk_and_is_terminated(cluster: Cluster) -> None:
    router, (worker,), client = await _setup(cluster)
    bad = msgpack.packb({"t": "ClientRequest", "v": 1, "b": {
        "request_id": "r1", "stream_subject": client.subject, "prompt": "x", "sampling": {"max_tokens": "many"}}})
    await client.send(bad)
    (chunk,) = await client.until_final()
    assert (chunk.request_id, chunk.seq, chunk.finish_reason) == ("r1", 0, "error")
    assert chunk.error.status == 400 and chunk.error.code == "invalid"
    assert "max_tokens" in chunk.error.message
    await client.send(b"\xc1 not msgpack")  # nothing to answer: counted and terminated
    await client.send(client.request(model="gpt-4"))  # valid, but not the served model
    (chunk,) = await client.until_final()
    assert chunk.error.status == 404
    await cluster.wait_until(lambda: router.metrics.intake_invalid._value.get() == 3, what="3 invalid counted")
    await _drained(client.bus)  # terminated: gone from the work queue
    assert worker.tasks == []


async def test_intake_rejects_reserved_stream_subjects(cluster: Cluster) -> None:
    router, (worker,), client = await _setup(cluster)
    root = client.bus.subjects.root
    await client.send(client.request(stream_subject=f"{root}.prefill.p0"))
    await client.send(client.request(stream_subject="a.*.b"))
    await cluster.wait_until(lambda: router.metrics.intake_invalid._value.get() == 2, what="2 invalid counted")
    assert worker.tasks == []
    ok = client.request(stream_subject=f"{root}.tokens.mine")  # kvrelay's own token subjects are fine
    sub_chunks: asyncio.Queue = asyncio.Queue()

    async def on(msg) -> None:
        await sub_chunks.put(unpack(msg.data, TokenChunk))

    await client.bus.subscribe(ok.stream_subject, on)
    await client.send(ok)
    assert (await asyncio.wait_for(sub_chunks.get(), 10)).seq == 0


async def test_intake_full_request_stream_pushes_back_on_the_publisher(cluster: Cluster) -> None:
    small = cluster.bus_config.replace(requests=StreamLimits(max_msgs=2, max_bytes=1 << 20, max_age_s=60.0,
                                                             storage="memory"))
    router, (worker,), client = await _setup(cluster, "hold", bus_config=small, intake_max_inflight=1)
    first = client.request()
    await client.send(first)
    await asyncio.wait_for(worker.got_task.wait(), 10)  # taken and held: the router has no room left
    await cluster.wait_until(lambda: len(router.intake._tasks) == 1, what="intake full")
    await _drained(client.bus)  # the first request's ack reached the server: room for two more
    queued = [client.request(), client.request()]
    for req in queued:
        await client.send(req)
    with pytest.raises(Backpressure):
        await client.send(client.request())
    worker.release.set()  # capacity frees up: the queued requests are served
    finals = [(await client.until_final())[-1] for _ in range(3)]
    assert sorted(c.request_id for c in finals) == sorted(r.request_id for r in [first, *queued])
    assert all(c.finish_reason == "length" for c in finals)


async def test_intake_deadline_sends_a_timeout_chunk_and_cancels(cluster: Cluster) -> None:
    router, (worker,), client = await _setup(cluster, "first_then_stall")
    req = client.request(timeout_s=0.5)
    await client.send(req)
    chunks = await client.until_final()
    assert [c.seq for c in chunks] == [0, 1]
    assert chunks[-1].error.code == "timeout" and chunks[-1].error.status == 504
    await asyncio.wait_for(worker.cancelled.wait(), 10)
    assert worker.cancels == [req.request_id]


async def test_intake_request_waits_in_the_stream_until_a_worker_comes(cluster: Cluster) -> None:
    router, _, client = await _setup(cluster, workers=0, intake_retry_delay_s=0.05)
    req = client.request(timeout_s=30.0)
    await client.send(req)
    await cluster.wait_until(lambda: router.metrics.intake_requeued._value.get() >= 2,
                             what="the request went back to the stream twice")
    worker = await cluster.worker("late")
    chunks = await client.until_final(timeout=20)
    assert chunks[-1].finish_reason == "length" and worker.tasks[0].request_id == req.request_id


async def test_intake_no_worker_until_the_deadline_is_503(cluster: Cluster) -> None:
    router, _, client = await _setup(cluster, workers=0, intake_retry_delay_s=0.05)
    await client.send(client.request(timeout_s=3.0))
    (chunk,) = await client.until_final()
    assert chunk.error.status == 503 and chunk.finish_reason == "error"
    await _drained(client.bus)


async def test_intake_client_cancel_frees_the_routers_slot(cluster: Cluster) -> None:
    router, (worker,), client = await _setup(cluster, "stall")
    req = client.request()
    await client.send(req)
    await asyncio.wait_for(worker.got_task.wait(), 10)
    await cluster.wait_until(lambda: req.request_id in router.dispatcher.flights, what="flight open")
    await client.bus.publish(client.bus.subjects.cancel("acme", req.request_id), Cancel(request_id=req.request_id))
    await cluster.wait_until(lambda: len(router.dispatcher.table) == 0, what="slot freed")
    await cluster.wait_until(lambda: router.metrics.requests.labels("nats", "cancelled")._value.get() == 1,
                             what="counted as cancelled")


async def test_intake_keeps_fetching_through_idle_periods(cluster: Cluster) -> None:
    router, (worker,), client = await _setup(cluster)
    router.intake.fetch_timeout_s = 0.002  # short: nats' own timeout races (either error type) show up
    await cluster.wait_until(lambda: router.intake.idle_fetches >= 50 or router.tasks[-1].done(),
                             what="fifty empty fetches")
    assert not any(t.done() for t in router.tasks)
    await client.send(client.request())
    assert (await client.until_final())[-1].finish_reason == "length"


async def test_intake_a_stream_whose_worker_leaves_gets_one_worker_lost_chunk(cluster: Cluster) -> None:
    router, (worker,), client = await _setup(cluster, "stall", watch_interval_s=0.05)
    await client.send(client.request())
    await asyncio.wait_for(worker.got_task.wait(), 10)
    await worker.stop()  # took the task, streamed nothing, left discovery
    (chunk,) = await client.until_final()
    assert chunk.finish_reason == "error" and chunk.error.code == "worker_lost" and chunk.error.status == 503
    assert "p0" in chunk.error.message
    assert client.chunks.empty()


async def test_intake_refused_request_waits_in_the_admission_queue_not_the_stream(cluster: Cluster) -> None:
    router = await cluster.router(admission_max_backoff_s=30.0)
    worker = await cluster.worker("p0", "hold", capacity=1)
    await cluster.seen(router, 1)
    await asyncio.wait_for(router.intake.ready.wait(), 10)
    client = await Client(await cluster.bus()).start()
    first, second = client.request(), client.request()
    await client.send(first)
    await cluster.wait_until(lambda: len(worker.accepted) == 1, what="the first held")
    await client.send(second)
    await cluster.wait_until(lambda: router.metrics.admission_waiting._value.get() == 1, what="the second waiting")
    worker.release.set()
    finals = [(await client.until_final())[-1] for _ in range(2)]
    assert all(c.finish_reason == "length" for c in finals)
    assert worker.accepted == [first.request_id, second.request_id]
    assert router.metrics.intake_requeued._value.get() == 0
