"""The simulated prefill engine's chunked turns (workers/sim/turns.py): a short prompt arriving while a
long one computes starts after the long one's current chunk. ``sim_time_scale=0``: every chunk's
sleep is one pass of the event loop, so the interleaving is deterministic (no clock)."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvrelay.schemas.messages import PrefillTask, SamplingSpec
from kvrelay.workers.config import EngineConfig, PrefillConfig
from kvrelay.workers.prefill_queue import Schedule
from kvrelay.workers.sim import SimPrefillEngine
from kvrelay.workers.sim.turns import Turns

pytestmark = pytest.mark.timeout(60)


def _task(rid: str, n: int, base: int) -> PrefillTask:
    return PrefillTask(request_id=rid, tenant="t", prompt_token_ids=[base + i % 500 for i in range(n)],
                       sampling=SamplingSpec(max_tokens=4), stream_subject=f"s.{rid}",
                       deadline_ms=int((time.time() + 30) * 1000))


async def _finish_order(step_tokens: int) -> list[str]:
    engine = SimPrefillEngine(EngineConfig(kind="sim", sim_time_scale=0.0),
                              PrefillConfig(export_mb=256, long_prompt_step_tokens=step_tokens))
    await engine.start()
    order: list[str] = []

    async def run(task: PrefillTask) -> None:
        out = await engine.prefill(task)
        order.append(task.request_id)
        engine.release(out.kv.ticket)

    try:
        long = asyncio.create_task(run(_task("long", 2000, 1)))
        while engine.stats().running == 0:  # the long prompt holds the compute unit
            await asyncio.sleep(0)
        await asyncio.gather(run(_task("short", 100, 7)), long)
    finally:
        await engine.stop()
    return order


async def test_sim_prefill_chunked_turns_let_a_short_prompt_pass_a_long_one_computing() -> None:
    assert await _finish_order(step_tokens=64) == ["short", "long"]
    assert await _finish_order(step_tokens=0) == ["long", "short"]  # whole prompts, first come first served


async def test_sim_turns_go_to_the_least_work_and_survive_a_cancelled_waiter() -> None:
    turns = Turns(Schedule(aging_tokens_per_s=0.0))
    await turns.acquire(500)
    got: list[str] = []

    async def wait(name: str, work: int) -> None:
        await turns.acquire(work)
        got.append(name)
        turns.release()

    big, gone, small = (asyncio.create_task(wait(n, w)) for n, w in (("big", 900), ("gone", 1), ("small", 50)))
    while len(turns.waiting) < 3:
        await asyncio.sleep(0)
    gone.cancel()  # cancelled while waiting: its turn is never handed out
    turns.release()
    await asyncio.gather(big, small)
    assert got == ["small", "big"] and gone.cancelled() and not turns.locked() and not turns.waiting
