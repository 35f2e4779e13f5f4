"""Local prefill on a decode worker (``local.<worker>``): the service around a simulated engine,
on a real nats-server. Admission against the slots, streaming from seq 0, refusals, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY
from workers_fake_engines import FakeDecodeEngine
from workers_harness import Collector, Service, config, prefill_done, worker_record

from kvrelay.config import Config
from kvrelay.schemas.messages import Cancel, DispatchReply, PrefillTask, SamplingSpec, TokenChunk
from kvrelay.transport.bus import Bus
from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.workers import decode as decode_worker
from kvrelay.workers.factory import decode_engine
from kvrelay.workers.service import Stream
from kvrelay.workers.sim import SimDecodeEngine, sim_tokens

pytestmark = pytest.mark.timeout(90)

PROMPT = [(i * 13) % 700 + 5 for i in range(70)]  # 2 full blocks of 32 and 6 tokens


@pytest.fixture
def kv_config(bus_config: BusConfig) -> BusConfig:
    return bus_config.replace(kv_events=StreamLimits(max_msgs=1000, max_bytes=1 << 20, max_age_s=60.0,
                                                     discard="old", storage="memory"))


@pytest.fixture
async def bus(kv_config: BusConfig) -> AsyncIterator[Bus]:
    b = await Bus.connect(kv_config, "test-client")
    await b.ensure_prefilled_stream()
    yield b
    await b.close()


def _cfg(bus_config: BusConfig, time_scale: float = 0.0, **decode) -> Config:
    cfg = config(bus_config, decode=decode)
    engine = {"kind": "sim", "sim_time_scale": time_scale, "sim_num_blocks": 512}
    return Config.from_mapping({**cfg.to_mapping(), "engine": engine, "cache": {"block_size": 32}})


def _task(rid: str, prompt: list[int], ns: str, max_tokens: int = 5, deadline_s: float = 60.0,
          subject: str = "") -> PrefillTask:
    return PrefillTask(request_id=rid, tenant="t", prompt_token_ids=prompt,
                       sampling=SamplingSpec(max_tokens=max_tokens),
                       stream_subject=subject or f"kvrelay.{ns}.tokens.{rid}",
                       deadline_ms=int((time.time() + deadline_s) * 1000))


async def _offer(bus: Bus, t: PrefillTask, worker: str = "d1") -> DispatchReply:
    return await bus.request(bus.subjects.local_prefill(worker), t, DispatchReply)


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _start(bus: Bus, cfg: Config) -> tuple[Service, SimDecodeEngine]:
    engine = decode_engine(cfg, "d1")
    svc = Service(decode_worker.serve, cfg, engine)
    await worker_record(bus, "d1")
    return svc, engine


async def test_stream_local_runs_the_whole_request_from_seq_0_and_reuses_its_cache(bus, kv_config,
                                                                                 namespace) -> None:
    svc, engine = await _start(bus, _cfg(kv_config))
    computed0 = _count("kvrelay_decode_local_prompt_tokens_total", source="computed")
    cached0 = _count("kvrelay_decode_local_prompt_tokens_total", source="cached")
    try:
        t1 = _task("r1", PROMPT, namespace)
        chunks = await Collector.open(bus, t1.stream_subject, TokenChunk)
        assert (await _offer(bus, t1)).accepted
        out = await chunks.until_final()
        assert [c.seq for c in out] == list(range(len(out))) and out[0].seq == 0
        assert [tok for c in out for tok in c.token_ids] == sim_tokens(PROMPT, 5)  # as prefill + decode would
        assert {c.worker for c in out} == {"d1"} and out[-1].finish_reason == "length"
        u = out[-1].usage
        assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (70, 5, 0)
        # the next step continues the prompt: the 2 full blocks it holds are not computed again
        longer = PROMPT + [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
        t2 = _task("r2", longer, namespace, max_tokens=3)
        chunks2 = await Collector.open(bus, t2.stream_subject, TokenChunk)
        assert (await _offer(bus, t2)).accepted
        out2 = await chunks2.until_final()
        assert [tok for c in out2 for tok in c.token_ids] == sim_tokens(longer, 3)
        assert out2[-1].usage.cached_tokens == 64
        assert engine.counters["local_prefills"] == 2 and engine.counters["imported"] == 0
        assert engine.counters["local_computed_tokens"] == 70 + 16
        assert _count("kvrelay_decode_local_prompt_tokens_total", source="computed") - computed0 == 86
        assert _count("kvrelay_decode_local_prompt_tokens_total", source="cached") - cached0 == 64
    finally:
        await svc.close()


async def test_stream_local_full_worker_refuses_and_pulled_work_waits_for_the_slot(bus, kv_config,
                                                                                   namespace) -> None:
    # modelled time runs in real time: the holder's 3000 tokens would take minutes; it is cancelled
    svc, engine = await _start(bus, _cfg(kv_config, time_scale=1.0, max_slots=1))
    try:
        holder = _task("hold", [1, 2, 3, 4, 5, 6, 7, 8], namespace, max_tokens=3000)
        held = await Collector.open(bus, holder.stream_subject, TokenChunk)
        assert (await _offer(bus, holder)).accepted
        await held.next()  # the holder runs
        refused = await _offer(bus, _task("r2", PROMPT, namespace))
        assert (refused.accepted, refused.code) == (False, "overloaded")
        returned = _count("kvrelay_decode_requests_total", outcome="returned")
        queued = prefill_done("q1", PROMPT, max_tokens=3, ns=namespace)
        q_chunks = await Collector.open(bus, queued.stream_subject, TokenChunk)
        await bus.js_publish(bus.subjects.prefilled, queued)
        assert "q1" not in engine._aborts  # pulled work does not start past max_slots
        await bus.publish(bus.subjects.cancel("t", "hold"), Cancel(request_id="hold"))
        rest = await held.until_final()
        assert rest[-1].finish_reason == "abort"
        q_out = await q_chunks.until_final()  # the slot came free: the queued request runs
        assert q_out[-1].finish_reason == "length" and q_out[-1].worker == "d1"
        # held for the slot, never nak'ed back (a nak spends one of its max_deliver deliveries)
        assert _count("kvrelay_decode_requests_total", outcome="returned") == returned
        assert (await _offer(bus, _task("r3", PROMPT, namespace, max_tokens=1))).accepted
    finally:
        await svc.close()


async def test_stream_local_refusals_say_why(bus, kv_config, namespace) -> None:
    svc, _ = await _start(bus, _cfg(kv_config))
    try:
        late = await _offer(bus, _task("late", PROMPT, namespace, deadline_s=-1.0))
        assert (late.accepted, late.code) == (False, "timeout")
        bad = await _offer(bus, _task("bad", PROMPT, namespace, subject="kvrelay.x.*"))
        assert (bad.accepted, bad.code) == (False, "invalid")
        huge = await _offer(bus, _task("huge", PROMPT, namespace, max_tokens=5000))  # over max_model_len
        assert (huge.accepted, huge.code) == (False, "invalid")
        # read after the router stopped waiting for the reply: refused, so it cannot run twice
        expired = _task("expired", PROMPT, namespace).replace(accept_by_ms=int(time.time() * 1000) - 1)
        gone = await _offer(bus, expired)
        assert (gone.accepted, gone.code) == (False, "timeout") and "offer expired" in gone.reason
    finally:
        await svc.close()


async def test_stream_local_engine_without_it_is_unsupported(bus, bus_config, namespace) -> None:
    svc = Service(decode_worker.serve, config(bus_config), FakeDecodeEngine())
    await worker_record(bus, "d1")
    try:
        reply = await _offer(bus, _task("r1", [1, 2, 3], namespace))
        assert (reply.accepted, reply.code) == (False, "unsupported")
    finally:
        await svc.close()


async def test_decode_service_admit_local_takes_slots_until_full_and_end_local_gives_them_back(
        bus, bus_config) -> None:
    svc = decode_worker.DecodeService(config(bus_config, decode={"max_slots": 2}).worker_process(),
                                      FakeDecodeEngine(), bus, "d1")
    gate = asyncio.Event()

    async def run(act: Stream) -> None:
        await asyncio.wait_for(gate.wait(), 30)
        svc.end_local(act, "stop")

    acts = [Stream(request_id=f"r{i}", subject=f"kvrelay.x.tokens.r{i}", deadline_ms=0, prompt_tokens=3)
            for i in range(3)]
    try:
        assert svc.admit_local(acts[0], lambda: run(acts[0]))
        assert svc.admit_local(acts[1], lambda: run(acts[1]))
        assert svc.knows("r0", "t") and svc.knows("r1", "t")
        assert not svc.admit_local(acts[2], lambda: run(acts[2]))  # full: nothing started
        assert not svc.knows("r2", "t") and acts[2].task is None
        stops = _count("kvrelay_decode_requests_total", outcome="stop")
        gate.set()
        await asyncio.wait_for(asyncio.gather(acts[0].task, acts[1].task), 10)
        assert not svc.knows("r0", "t") and not svc.knows("r1", "t")
        assert (svc.slots.used, svc.slots.borrowed) == (0, 0)
        assert _count("kvrelay_decode_requests_total", outcome="stop") - stops == 2
        assert svc.admit_local(acts[2], lambda: run(acts[2]))  # a slot came back
        await asyncio.wait_for(acts[2].task, 10)
    finally:
        await svc.owner.close()


async def test_stream_local_budget_refuses_what_would_break_the_itl_target_until_tokens_are_computed(
        bus, kv_config, namespace) -> None:
    # 50 ms target, 0.01 ms a prompt token, one step of backlog: 5000 prompt tokens in flight at most.
    # Modelled time runs in real time: the holder's 3000 tokens take seconds to prefill (it is cancelled)
    cfg = _cfg(kv_config, time_scale=1.0, local_itl_target_ms=50.0, local_step_ms=0.0, local_token_ms=0.01,
               local_budget_steps=1)
    svc, _ = await _start(bus, cfg)
    budget0 = _count("kvrelay_decode_local_prefill_total", outcome="budget")
    try:
        holder = _task("hold", [(i * 7) % 900 + 1 for i in range(3000)], namespace)
        held = await Collector.open(bus, holder.stream_subject, TokenChunk)
        assert (await _offer(bus, holder)).accepted
        big = _task("big", [(i * 11) % 900 + 1 for i in range(2500)], namespace)
        refused = await _offer(bus, big)
        assert (refused.accepted, refused.code) == (False, "overloaded") and "budget" in refused.reason
        assert _count("kvrelay_decode_local_prefill_total", outcome="budget") - budget0 == 1
        # what the router expects cached here is not counted: the same prompt fits when mostly held
        mostly = big.replace(request_id="big-cached", cached_tokens=2048)
        mostly_out = await Collector.open(bus, mostly.stream_subject, TokenChunk)
        assert (await _offer(bus, mostly)).accepted
        for rid in ("big-cached", "hold"):
            await bus.publish(bus.subjects.cancel("t", rid), Cancel(request_id=rid))
        # a request's tokens come back before its last chunk goes out (at its first delta)
        assert (await held.until_final())[-1].finish_reason == "abort"
        assert (await mostly_out.until_final())[-1].finish_reason == "abort"
        assert (await _offer(bus, big.replace(request_id="big-again"))).accepted
        await bus.publish(bus.subjects.cancel("t", "big-again"), Cancel(request_id="big-again"))
    finally:
        await svc.close()
