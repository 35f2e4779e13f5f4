"""Helpers for the worker-service tests: run a service, collect bus messages, read the bucket.

Everything waits on messages or state with a timeout; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from workers_fake_engines import LAYOUT, first_token

from kvrelay.config import Config
from kvrelay.schemas.codec import Message, unpack
from kvrelay.schemas.messages import (
    KVDescriptor,
    PrefillDone,
    PrefillTask,
    SamplingSpec,
    TokenChunk,
    WorkerInfo,
)
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig
from kvrelay.transport.discovery import open_bucket

Serve = Callable[[Config, asyncio.Event, Any], Awaitable[None]]


def config(bus: BusConfig, prefill: dict[str, Any] | None = None, decode: dict[str, Any] | None = None,
           **bus_overrides: Any) -> Config:
    """A root config on this test's bus, with fast heartbeats and the given worker settings."""
    # only the heartbeat differs from the test client's bus config: the discovery bucket (made by
    # whoever opens it first) must be created with the same TTL by both
    data: dict[str, Any] = {"bus": {**bus.to_mapping(), "heartbeat_s": 0.1, **bus_overrides}}
    data["prefill"] = {"worker_id": "p1", "lease_check_s": 0.05, "drain_timeout_s": 0.5, **(prefill or {})}
    data["decode"] = {"worker_id": "d1", "fetch_timeout_s": 0.2, "drain_timeout_s": 0.5, **(decode or {})}
    return Config.from_mapping(data)


class Service:
    """A worker service running as a task; ``close()`` stops it and waits for it (bounded)."""

    def __init__(self, serve: Serve, cfg: Config, engine: Any) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(serve(cfg, self.stop, engine), name="service-under-test")

    async def close(self, timeout: float = 15.0) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, timeout)


class Collector:
    """Every message on ``subject``, decoded as ``kind``, in arrival order."""

    def __init__(self, kind: type[Message]) -> None:
        self.kind = kind
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.sub: Any = None

    @classmethod
    async def open(cls, bus: Bus, subject: str, kind: type[Message]) -> Collector:
        col = cls(kind)

        async def on_msg(msg: Any) -> None:
            col.queue.put_nowait(unpack(msg.data, kind))

        col.sub = await bus.subscribe(subject, on_msg)
        await bus.nc.flush()
        return col

    async def next(self, timeout: float = 30.0) -> Any:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def until_final(self, timeout: float = 60.0) -> list[TokenChunk]:
        """Token chunks up to and including the one with ``finish_reason``."""
        out: list[TokenChunk] = []
        while not out or out[-1].finish_reason is None:
            out.append(await self.next(timeout))
        return out

    def drained(self) -> list[Any]:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


def task(rid: str, prompt: list[int], max_tokens: int = 4, deadline_s: float = 30.0, ns: str = "x",
         decode_hint: str = "") -> PrefillTask:
    return PrefillTask(
        request_id=rid, tenant="t", prompt_token_ids=prompt, sampling=SamplingSpec(max_tokens=max_tokens),
        stream_subject=f"kvrelay.{ns}.tokens.{rid}", deadline_ms=int((time.time() + deadline_s) * 1000),
        decode_hint=decode_hint,
    )


async def worker_record(bus: Bus, wid: str, pred: Callable[[WorkerInfo], bool] = lambda _: True,
                        timeout: float = 30.0) -> WorkerInfo:
    """The worker's discovery record once ``pred`` holds for it (watches the bucket)."""
    kv = await open_bucket(bus)
    watcher = await kv.watch(wid)
    try:
        async def loop() -> WorkerInfo:
            while True:
                try:
                    entry = await watcher.updates(timeout=timeout)
                except asyncio.TimeoutError:
                    continue
                if entry is None or not entry.value or entry.operation in ("DEL", "PURGE"):
                    continue
                info = unpack(entry.value, WorkerInfo)
                if pred(info):
                    return info

        return await asyncio.wait_for(loop(), timeout)
    finally:
        await watcher.stop()


async def record_gone(bus: Bus, wid: str) -> bool:
    kv = await open_bucket(bus)
    try:
        entry = await kv.get(wid)
    except Exception:  # noqa: BLE001 - KeyNotFoundError / KeyDeletedError: the record is gone
        return True
    return not entry.value


async def stream_count(bus: Bus) -> int:
    info = await bus.js.stream_info(bus.subjects.stream_prefilled)
    return info.state.messages


def prefill_done(rid: str, prompt: list[int], max_tokens: int = 4, ns: str = "x", ticket: int = 1,
                 deadline_s: float = 30.0, prefill_worker: str = "p1") -> PrefillDone:
    """What a prefill worker would put on the work queue for ``rid`` (for decode-only tests)."""
    kv = KVDescriptor(backend="shm", worker_id=prefill_worker, host="localhost", region="fake-region",
                      block_ids=[0], num_tokens=len(prompt), ticket=ticket,
                      lease_expires_ms=int((time.time() + 30) * 1000), layout=LAYOUT)
    return PrefillDone(
        request_id=rid, tenant="t", prompt_token_ids=prompt, first_token_id=first_token(prompt),
        sampling=SamplingSpec(max_tokens=max_tokens), stream_subject=f"kvrelay.{ns}.tokens.{rid}",
        deadline_ms=int((time.time() + deadline_s) * 1000), prefill_worker=prefill_worker, kv=kv,
    )


async def consumer_state(bus: Bus, durable: str) -> tuple[int, int]:
    """(messages not yet delivered, delivered but not acked) of a consumer on the work queue."""
    info = await bus.js.consumer_info(bus.subjects.stream_prefilled, durable)
    return info.num_pending, info.num_ack_pending


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Re-check a server-side condition that sends no event (JetStream stream/consumer state: acks
    are applied asynchronously) until it holds; TimeoutError after ``timeout``."""
    async def loop() -> None:
        while not await check():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(loop(), timeout)
