"""Router test fixtures: the tiny model's tokenizer, routers on free ports, and a FAKE WORKER.

The fake worker speaks the real protocol over a real nats-server: it announces itself in the
discovery bucket, answers ``PrefillTask``s on ``prefill.<id>`` with a ``DispatchReply`` and
publishes ``TokenChunk``s to the task's stream subject, and records the Cancels it sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Literal

import nats.errors
import pytest

from kvrelay import models
from kvrelay.router import index as index_mod
from kvrelay.router.app import Router
from kvrelay.router.config import RouterConfig, RouterProcessConfig
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.router.tokenizer import RouterTokenizer
from kvrelay.schemas.codec import unpack
from kvrelay.schemas.messages import Cancel, DispatchReply, ErrorInfo, PrefillTask, TokenChunk, Usage, WorkerInfo
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.transport.discovery import Announcer

Mode = Literal["ok", "reject", "invalid", "silent", "hold", "stall", "error", "first_then_stall", "first_then_error",
               "shuffle", "handover_then_stall"]
WAIT_S = 30.0  # a deadline for conditions, generous for a loaded 2-core CI machine


@pytest.fixture(params=["native", "python"])
def index_impl(request, monkeypatch) -> str:
    """The prefix index's storage: the C one (HolderTable) and the pure-Python one (HolderMap).
    A module that uses it (``pytestmark = pytest.mark.usefixtures("index_impl")``) runs on both."""
    if request.param == "native":
        assert index_mod.NATIVE, "kvrelay.router._holders is not built (no C compiler?)"
    monkeypatch.setattr(index_mod, "NATIVE", request.param == "native")
    return request.param


def token_text(i: int) -> str:
    return f" t{i}"


def expected_text(prompt_tokens: int, n: int) -> str:
    """What a fake worker streams for a prompt of ``prompt_tokens`` tokens and ``n`` output tokens."""
    return f"[{prompt_tokens}]" + "".join(token_text(i) for i in range(1, n))


class FakeWorker:
    """Prefill + decode in one: ``mode`` says how it answers (see ``_on_task``)."""

    def __init__(self, bus: Bus, worker_id: str, mode: Mode = "ok", tokens: int = 4,
                 role: Literal["prefill", "decode", "both"] = "prefill", decoder: str = "d0",
                 capacity: int = 0) -> None:
        self.bus, self.worker_id, self.mode, self.tokens, self.role = bus, worker_id, mode, tokens, role
        self.capacity = capacity  # > 0: refuses ("overloaded") while this many of its streams are unfinished
        self.live: set[str] = set()  # the requests it took whose final chunk it has not sent
        self.accepted: list[str] = []  # request ids it took, in order
        self.decoder = decoder  # "handover_then_stall": the decode worker its second chunk claims to be from
        self.tasks: list[PrefillTask] = []
        self.cancels: list[str] = []
        self.got_task = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()  # "hold" mode streams once this is set
        self._subs: list = []
        self._bg: set[asyncio.Task] = set()

    def info(self) -> WorkerInfo:
        return WorkerInfo(worker_id=self.worker_id, role=self.role, model="kvrelay-tiny", host="test",
                          block_size=32, max_slots=8)

    async def start(self) -> None:
        if self.role != "decode":
            self._subs.append(await self.bus.subscribe(self.bus.subjects.prefill(self.worker_id), self._on_task))
        self._subs.append(await self.bus.subscribe(self.bus.subjects.cancel_all, self._on_cancel))
        self._spawn(Announcer(self.bus, self.worker_id, self.info).run())

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        for task in list(self._bg):
            task.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _on_cancel(self, msg) -> None:
        self.cancels.append(unpack(msg.data, Cancel).request_id)
        self.cancelled.set()

    async def _on_task(self, msg) -> None:
        task = unpack(msg.data, PrefillTask)
        self.tasks.append(task)
        self.got_task.set()
        if self.mode == "silent":
            return
        if self.mode in ("reject", "invalid"):
            code, reason = ("overloaded", "queue full") if self.mode == "reject" else ("invalid", "prompt too long")
            await self.bus.respond(msg, DispatchReply(accepted=False, code=code, reason=reason))
            return
        if self.capacity and len(self.live) >= self.capacity:
            await self.bus.respond(msg, DispatchReply(accepted=False, code="overloaded", reason="at capacity"))
            return
        self.live.add(task.request_id)
        self.accepted.append(task.request_id)
        await self.bus.respond(msg, DispatchReply(accepted=True, queued_tokens=len(task.prompt_token_ids)))
        self._spawn(self._counted(task))

    async def _counted(self, task: PrefillTask) -> None:
        try:
            await self._stream(task)
        finally:
            self.live.discard(task.request_id)

    def chunks(self, task: PrefillTask) -> list[TokenChunk]:
        n = min(self.tokens, task.sampling.max_tokens)
        p = len(task.prompt_token_ids)
        out = []
        for i in range(n):
            final = i == n - 1
            out.append(TokenChunk(
                request_id=task.request_id, seq=i, token_ids=[100 + i], text=f"[{p}]" if i == 0 else token_text(i),
                finish_reason=("length" if n == task.sampling.max_tokens else "stop") if final else None,
                usage=Usage(prompt_tokens=p, completion_tokens=n, cached_tokens=2) if final else None,
                worker=self.worker_id))
        return out

    async def _send(self, task: PrefillTask, chunk: TokenChunk) -> None:
        if chunk.finish_reason is not None:  # room again before the router hears the end
            self.live.discard(task.request_id)
        await self.bus.publish(task.stream_subject, chunk)

    async def _stream(self, task: PrefillTask) -> None:
        chunks = self.chunks(task)
        if self.mode == "stall":
            return
        if self.mode == "hold":
            await self.release.wait()
        if self.mode == "error":
            err = ErrorInfo(code="engine", message="the engine fell over", status=503)
            await self._send(task, TokenChunk(request_id=task.request_id, seq=0, finish_reason="error", error=err))
            return
        if self.mode == "handover_then_stall":  # the first token here, one from a decode worker, then silence
            await self._send(task, chunks[0])
            await self._send(task, chunks[1].replace(worker=self.decoder))
            return
        if self.mode in ("first_then_stall", "first_then_error"):
            await self._send(task, chunks[0])
            if self.mode == "first_then_error":
                err = ErrorInfo(code="transfer", message="the KV transfer failed", status=502)
                await self._send(task, TokenChunk(request_id=task.request_id, seq=1, finish_reason="error",
                                                  error=err))
            return
        if self.mode == "shuffle":  # out of order, with duplicates
            chunks = chunks[::-1] + [chunks[0], chunks[-1]]
            random.Random(7).shuffle(chunks)
        for chunk in chunks:
            await self._send(task, chunk)


@pytest.fixture(scope="session")
def tokenizer() -> Iterator[RouterTokenizer]:
    tok = RouterTokenizer.load_sync(models.resolve("tiny"))
    yield tok
    tok.close()


async def wait_until(cond: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition",
                     event: asyncio.Event | None = None) -> None:
    """Wait for ``cond`` (re-checked whenever ``event`` is set, or every 10 ms without one)."""
    async def loop() -> None:
        while not cond():
            if event is None:
                await asyncio.sleep(0.01)
            else:
                event.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), 0.5)

    try:
        await asyncio.wait_for(loop(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


class Cluster:
    """A router plus fake workers on one namespace; everything stopped at teardown.

    Test modules cannot import this conftest (``--import-mode=importlib``), so the helpers
    they need are reachable from here too.
    """

    expected_text = staticmethod(expected_text)
    wait_until = staticmethod(wait_until)

    def __init__(self, bus_config: BusConfig, tokenizer: RouterTokenizer) -> None:
        # JetStream reserves a stream's max_bytes up front: keep the shared test server's store free
        small = StreamLimits(max_msgs=1000, max_bytes=4 << 20, max_age_s=60.0, storage="memory")
        events = StreamLimits(max_msgs=1000, max_bytes=4 << 20, max_age_s=60.0, storage="memory", discard="old")
        self.bus_config, self.tokenizer = bus_config.replace(requests=small, kv_events=events), tokenizer
        self.routers: list[Router] = []
        self.workers: list[FakeWorker] = []
        self.buses: list[Bus] = []

    async def bus(self) -> Bus:
        bus = await Bus.connect(self.bus_config, "test")
        self.buses.append(bus)
        return bus

    async def router(self, policy=None, bus_config: BusConfig | None = None, hasher=None,
                     policy_name: str = "least_loaded", cache: CacheConfig = CacheConfig(),
                     **router_cfg) -> Router:
        rc = RouterConfig(http_port=0, model=str(self.tokenizer.folder), policy=policy_name, **router_cfg)
        cfg = RouterProcessConfig(bus=bus_config or self.bus_config, cache=cache, router=rc)
        router = Router(cfg, tokenizer=self.tokenizer, policy=policy, hasher=hasher)
        self.routers.append(router)
        await router.start()
        return router

    async def worker(self, worker_id: str, mode: Mode = "ok", **kw) -> FakeWorker:
        worker = FakeWorker(await self.bus(), worker_id, mode, **kw)
        self.workers.append(worker)
        await worker.start()
        return worker

    async def seen(self, router: Router, prefill: int, decode: int = 0) -> None:
        """Wait until ``router`` sees this many live prefill (and decode) workers."""
        d = router.directory

        def ok() -> bool:
            live = d.live()
            return (sum(w.role in ("prefill", "both") for w in live) >= prefill
                    and sum(w.role in ("decode", "both") for w in live) >= decode)

        await wait_until(ok, what=f"{prefill} prefill and {decode} decode workers", event=d.changed)

    async def close(self) -> None:
        for router in self.routers:
            await router.stop()
        for worker in self.workers:
            await worker.stop()
        bus = await self.bus()
        s = bus.subjects
        for delete, name in ((bus.js.delete_stream, s.stream_requests), (bus.js.delete_stream, s.stream_kv_events),
                             (bus.js.delete_key_value, s.bucket_workers)):
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):  # nothing to free
                await delete(name)
        for bus in self.buses:
            await bus.close()


@pytest.fixture
async def cluster(bus_config: BusConfig, tokenizer: RouterTokenizer) -> AsyncIterator[Cluster]:
    c = Cluster(bus_config, tokenizer)
    try:
        yield c
    finally:
        await c.close()
