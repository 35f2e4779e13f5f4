"""Local-prefill dispatch (decode affinity) by a real kv_aware router over a real nats-server.

The prefill worker is the conftest's fake; the decode worker here is a small fake that speaks
the local-prefill protocol (``local.<worker>``: PrefillTask -> DispatchReply, then TokenChunks
seq 0...). Sessions are seeded the way a finished step records them (``LocalRouting.finished``);
that a real step records them is shown end to end in ``test_local_prefill_sim.py``.
"""

from __future__ import annotations

import asyncio
import time
import contextlib
import json
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
import nats.errors
import pytest

from kvrelay.router.sessions import Session, marks
from kvrelay.schemas.codec import unpack
from kvrelay.schemas.messages import (
    ClientRequest,
    DispatchReply,
    PrefillTask,
    SamplingSpec,
    TokenChunk,
    Usage,
    WorkerInfo,
)
from kvrelay.transport.bus import Bus
from kvrelay.transport.discovery import Announcer

if TYPE_CHECKING:
    from conftest import Cluster

MODEL = "kvrelay-tiny"
TENANT = "default"
STEP1 = [(i * 37) % 900 + 10 for i in range(96)]  # 3 full blocks of 32
STEP2 = STEP1 + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # 10 new tokens


class FakeDecode:
    """A decode worker's local-prefill side: ``accept`` (streams 3 tokens), ``refuse``, ``silent``."""

    def __init__(self, bus: Bus, worker_id: str, mode: str = "accept", active: int = 0) -> None:
        self.bus, self.worker_id, self.mode, self.active = bus, worker_id, mode, active
        self.tasks: list[PrefillTask] = []
        self._subs: list = []
        self._bg: set[asyncio.Task] = set()

    def info(self) -> WorkerInfo:
        return WorkerInfo(worker_id=self.worker_id, role="decode", model=MODEL, host="test", block_size=32,
                          max_slots=2, active=self.active)

    async def start(self) -> FakeDecode:
        self._subs.append(await self.bus.subscribe(self.bus.subjects.local_prefill(self.worker_id), self._on))
        self._spawn(Announcer(self.bus, self.worker_id, self.info).run())
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _on(self, msg) -> None:
        task = unpack(msg.data, PrefillTask)
        self.tasks.append(task)
        if self.mode == "silent":
            return
        if self.mode == "refuse":
            await self.bus.respond(msg, DispatchReply(accepted=False, code="overloaded", reason="slots full"))
            return
        await self.bus.respond(msg, DispatchReply(accepted=True))
        self._spawn(self._stream(task))

    async def _stream(self, task: PrefillTask) -> None:
        p = len(task.prompt_token_ids)
        for i in range(3):
            final = i == 2
            await self.bus.publish(task.stream_subject, TokenChunk(
                request_id=task.request_id, seq=i, token_ids=[500 + i], text=f" local{i}",
                finish_reason="length" if final else None, worker=self.worker_id,
                usage=Usage(prompt_tokens=p, completion_tokens=3, cached_tokens=96) if final else None))


@pytest.fixture
async def fakes(cluster: Cluster):
    made: list[FakeDecode] = []

    async def make(wid: str = "d1", **kw) -> FakeDecode:
        f = await FakeDecode(await cluster.bus(), wid, **kw).start()
        made.append(f)
        return f

    yield make
    for f in made:
        await f.stop()


async def _setup(cluster: Cluster, fakes, mode: str = "accept", active: int = 0, **router_cfg):
    router_cfg.setdefault("kv_local_threshold_tokens", 64)
    router = await cluster.router(policy_name="kv_aware", **router_cfg)
    prefill = await cluster.worker("p0", tokens=4)
    dec = await fakes("d1", mode=mode, active=active)
    await cluster.seen(router, 1, 1)
    local = router.dispatcher.local
    local.sessions.put(TENANT, "s1", Session("d1", len(STEP1), marks(router.hasher(STEP1, TENANT))))
    return router, prefill, dec


async def _complete(url: str, prompt: list[int], session: Any = "s1", headers: dict | None = None,
                    raw: bool = False) -> tuple[int, dict]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0}
    if session is not None:
        body["session_id"] = session
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", data=json.dumps(body),
                                                    headers=headers or {}) as r:
        return r.status, await r.json(content_type=None)


def _sample(router, name: str, **labels: str) -> float:
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_dispatcher_local_session_step_goes_to_its_decode_worker(cluster: Cluster, fakes) -> None:
    router, prefill, dec = await _setup(cluster, fakes)
    status, body = await _complete(router.url, STEP2)
    assert status == 200, body
    assert body["choices"][0]["text"] == " local0 local1 local2"
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert [t.prompt_token_ids for t in dec.tasks] == [STEP2] and prefill.tasks == []
    assert dec.tasks[0].tenant == TENANT and dec.tasks[0].sampling.max_tokens == 3
    assert _sample(router, "kvrelay_router_local_prefill_total", reason="decode_affinity",
                   outcome="accepted") == 1
    assert _sample(router, "kvrelay_router_session_lookups_total", result="hit") == 1
    # the finished step (on d1 again) is the session's new record: prompt + output but the last token
    rec = router.dispatcher.local.sessions.get(TENANT, "s1")
    assert (rec.worker, rec.tokens) == ("d1", len(STEP2) + 2)
    assert len(router.dispatcher.table) == 0


async def test_dispatcher_local_refused_falls_back_to_the_prefill_path(cluster: Cluster, fakes) -> None:
    router, prefill, dec = await _setup(cluster, fakes, mode="refuse")
    status, body = await _complete(router.url, STEP2)
    assert status == 200, body
    assert body["choices"][0]["text"] == cluster.expected_text(len(STEP2), 3)  # the prefill worker's
    assert len(dec.tasks) == 1 and [t.prompt_token_ids for t in prefill.tasks] == [STEP2]
    assert prefill.tasks[0].request_id == dec.tasks[0].request_id
    assert _sample(router, "kvrelay_router_local_prefill_total", reason="decode_affinity",
                   outcome="overloaded") == 1
    # the step finished on a prefill worker (the fake streams every token): the record stays
    assert router.dispatcher.local.sessions.get(TENANT, "s1").worker == "d1"


async def test_dispatcher_local_unanswered_falls_back_after_the_dispatch_timeout(cluster: Cluster,
                                                                                 fakes) -> None:
    router, prefill, dec = await _setup(cluster, fakes, mode="silent", dispatch_timeout_s=0.3)
    sent_ms = time.time() * 1000
    status, body = await _complete(router.url, STEP2)
    assert status == 200, body
    assert len(dec.tasks) == 1 and len(prefill.tasks) == 1
    # the unanswered offer expired half-way through the wait: a late reader refuses, never runs it too
    assert sent_ms < dec.tasks[0].accept_by_ms <= time.time() * 1000 and dec.tasks[0].accept_by_ms > 0
    assert dec.tasks[0].accept_by_ms - sent_ms <= 0.3 * 500 + 100
    assert _sample(router, "kvrelay_router_local_prefill_total", reason="decode_affinity",
                   outcome="timeout") == 1


async def test_dispatcher_local_full_decode_worker_is_not_asked(cluster: Cluster, fakes) -> None:
    router, prefill, dec = await _setup(cluster, fakes, active=2)  # its heartbeat: 2 of 2 slots used
    status, _ = await _complete(router.url, STEP2)
    assert status == 200
    assert dec.tasks == [] and len(prefill.tasks) == 1
    assert _sample(router, "kvrelay_router_session_lookups_total", result="worker_busy") == 1


async def test_dispatcher_local_needs_a_continuing_prompt_and_the_switch(cluster: Cluster, fakes) -> None:
    router, prefill, dec = await _setup(cluster, fakes)
    other = [7] * 100  # the session's worker holds nothing of this prompt
    assert (await _complete(router.url, other))[0] == 200
    far = STEP1 + [9] * 80  # 80 uncached tokens > the threshold of 64
    assert (await _complete(router.url, far))[0] == 200
    assert dec.tasks == [] and len(prefill.tasks) == 2
    off, p_off, d_off = await _setup(cluster, fakes, kv_local_prefill=False)
    assert (await _complete(off.url, STEP2))[0] == 200
    assert d_off.tasks == []


async def test_dispatcher_local_nats_client_names_its_session(cluster: Cluster, fakes) -> None:
    router, prefill, dec = await _setup(cluster, fakes)
    await asyncio.wait_for(router.intake.ready.wait(), 10)
    bus = await cluster.bus()
    subject = f"client.{uuid.uuid4().hex}.out"
    chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on(msg) -> None:
        await chunks.put(unpack(msg.data, TokenChunk))

    await bus.subscribe(subject, on)
    req = ClientRequest(request_id=uuid.uuid4().hex, stream_subject=subject, prompt_token_ids=STEP2,
                        sampling=SamplingSpec(max_tokens=3), session_id="s1")
    await bus.js_publish(bus.subjects.request(TENANT), req)
    out = [await asyncio.wait_for(chunks.get(), 10) for _ in range(3)]
    assert [c.worker for c in out] == ["d1"] * 3 and out[-1].finish_reason == "length"
    assert [t.request_id for t in dec.tasks] == [req.request_id] and prefill.tasks == []


@pytest.mark.parametrize("session, headers, param", [
    ("x" * 129, None, "session_id"),
    (42, None, "session_id"),
    ("two words", None, "session_id"),
    (None, {"X-Session-Id": "y" * 200}, "X-Session-Id"),
    ("a", {"X-Session-Id": "b"}, "X-Session-Id"),
])
async def test_dispatcher_local_bad_session_id_is_400(cluster: Cluster, fakes, session, headers,
                                                       param: str) -> None:
    router, prefill, dec = await _setup(cluster, fakes)
    status, body = await _complete(router.url, STEP2, session=session, headers=headers)
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
    assert dec.tasks == [] and prefill.tasks == []


async def test_dispatcher_local_session_header_is_accepted(cluster: Cluster, fakes) -> None:
    router, prefill, dec = await _setup(cluster, fakes)
    status, _ = await _complete(router.url, STEP2, session=None, headers={"X-Session-Id": "s1"})
    assert status == 200 and len(dec.tasks) == 1 and prefill.tasks == []
