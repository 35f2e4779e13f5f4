"""The prefill admission decision, queue and schedule: pure logic, no I/O (the clock is passed in)."""

from __future__ import annotations

import random

from kvrelay.schemas.messages import PrefillTask, SamplingSpec
from kvrelay.workers.config import PrefillConfig
from kvrelay.workers.prefill_queue import PrefillQueue, Schedule, blocks_for, schedule_of

NOW = 1_000_000


def _task(rid: str, n: int, deadline_ms: int = NOW + 10_000) -> PrefillTask:
    return PrefillTask(request_id=rid, tenant="t", prompt_token_ids=[1] * n, sampling=SamplingSpec(),
                       stream_subject=f"s.{rid}", deadline_ms=deadline_ms)


def test_prefill_queue_is_fifo_and_counts_tokens_and_blocks() -> None:
    q = PrefillQueue(max_tasks=4, max_tokens=100, block_size=4, schedule=Schedule("fifo"))
    for rid, n in (("b", 8), ("a", 5)):
        assert q.check(_task(rid, n), NOW, False, 100, 0) is None
        q.push(_task(rid, n))
    assert (len(q), q.tokens, q.blocks) == (2, 13, 2 + 2)
    assert q.pop().task.request_id == "b"  # first in, though longer
    assert (q.tokens, q.blocks) == (5, 2)
    assert q.remove("a").task.request_id == "a" and q.remove("a") is None
    assert q.pop() is None and (q.tokens, q.blocks) == (0, 0)


def test_prefill_queue_rejections_name_their_reason() -> None:
    q = PrefillQueue(max_tasks=1, max_tokens=10, block_size=4)
    assert q.check(_task("a", 2), NOW, True, 100, 0).code == "draining"
    assert q.check(_task("a", 2, deadline_ms=NOW - 1), NOW, False, 100, 0).code == "timeout"
    expired = q.check(_task("a", 2).replace(accept_by_ms=NOW - 1), NOW, False, 100, 0)
    assert expired.code == "timeout" and "offer expired" in expired.reason
    assert q.check(_task("a", 2).replace(accept_by_ms=NOW), NOW, False, 100, 0) is None  # still in time
    assert q.check(_task("a", 9), NOW, False, 2, 0).code == "overloaded"  # 3 blocks, 2 free
    assert q.check(_task("a", 4), NOW, False, 2, 2).code == "overloaded"  # 2 free, 2 promised
    q.push(_task("a", 4))
    rej = q.check(_task("b", 1), NOW, False, 100, 0)
    assert rej.code == "overloaded" and "tasks" in rej.reason


def test_prefill_queue_token_bound_admits_one_oversized_prompt_into_an_empty_queue() -> None:
    q = PrefillQueue(max_tasks=8, max_tokens=10, block_size=4)
    assert q.check(_task("big", 50), NOW, False, 100, 0) is None  # else it could run nowhere
    q.push(_task("big", 50))
    assert q.check(_task("small", 1), NOW, False, 100, 0).code == "overloaded"


def test_prefill_queue_no_deadline_means_none() -> None:
    q = PrefillQueue(max_tasks=1, max_tokens=10, block_size=4)
    assert q.check(_task("a", 1, deadline_ms=0), NOW, False, 100, 0) is None
    assert blocks_for(9, 4) == 3 and blocks_for(8, 4) == 2


def test_prefill_queue_rejects_a_task_over_the_model_context_as_invalid() -> None:
    from kvrelay.schemas import PrefillTask, SamplingSpec
    from kvrelay.workers.prefill_queue import PrefillQueue

    q = PrefillQueue(max_tasks=4, max_tokens=10_000, block_size=32, max_model_len=100)
    task = PrefillTask(request_id="r", tenant="t", prompt_token_ids=[1] * 90, sampling=SamplingSpec(max_tokens=11),
                       stream_subject="s.x", deadline_ms=0)
    rej = q.check(task, now_ms=1, draining=False, export_free_blocks=100, committed_blocks=0)
    assert rej is not None and rej.code == "invalid" and "context" in rej.reason
    ok = task.replace(sampling=SamplingSpec(max_tokens=10))
    assert q.check(ok, now_ms=1, draining=False, export_free_blocks=100, committed_blocks=0) is None


# --- the schedule: shortest first, aged, a bound on overtakes -----------------------------------
def _queue(schedule: Schedule = Schedule(), max_tasks: int = 64) -> PrefillQueue:
    return PrefillQueue(max_tasks=max_tasks, max_tokens=1 << 30, block_size=16, schedule=schedule)


def test_prefill_queue_short_task_overtakes_long_ones_waiting() -> None:
    q = _queue()
    q.push(_task("long-1", 3000), now=0.0)
    q.push(_task("long-2", 2000), now=0.0)
    q.push(_task("short", 100), now=0.1)
    assert [q.pop(now=0.2).task.request_id for _ in range(3)] == ["short", "long-2", "long-1"]
    # what the router expects cached does not count as work: a long prompt mostly cached is short
    q.push(_task("fresh", 500), now=1.0)
    q.push(_task("cached", 3000).replace(cached_tokens=2900), now=1.0)
    assert q.pop(now=1.0).task.request_id == "cached"
    assert q.schedule == schedule_of(PrefillConfig()) and PrefillConfig().schedule == "shortest"


def test_prefill_queue_aging_lets_a_long_task_pass_shorts_that_came_much_later() -> None:
    q = _queue(Schedule(aging_tokens_per_s=1000.0))
    q.push(_task("long", 3000), now=0.0)
    # keys: work - 1000 * seconds waited; a short one 2.8 s later still passes (200 > 100) ...
    q.push(_task("late-short", 100), now=2.8)
    assert q.pop(now=2.8).task.request_id == "late-short"
    # ... one 3 s later (3000 / 1000 s: whatever its size) no longer does
    q.push(_task("later-short", 1), now=3.0)
    assert q.pop(now=3.0).task.request_id == "long"


def test_prefill_queue_a_task_is_passed_over_at_most_max_overtakes_times() -> None:
    q = _queue(Schedule(aging_tokens_per_s=0.0, max_overtakes=3))  # no aging: the count alone
    q.push(_task("long", 3000), now=0.0)
    taken = []
    for i in range(6):  # a steady stream of short prompts
        q.push(_task(f"s{i}", 10), now=float(i))
        taken.append(q.pop(now=float(i)).task.request_id)
    assert taken == ["s0", "s1", "s2", "long", "s3", "s4"]  # then ties go to the older
    assert q.pop(now=9.0).task.request_id == "s5"


def test_prefill_queue_every_task_is_taken_within_its_bound_and_passed_only_by_early_arrivals() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        sched = Schedule(aging_tokens_per_s=rng.choice([0.0, 100.0, 1000.0]), max_overtakes=rng.choice([0, 2, 16]))
        q = _queue(sched, max_tasks=12)
        now, pops, info = 0.0, 0, {}  # request id -> (pops when pushed, tasks ahead, arrival, work)
        for i in range(600):
            now += rng.expovariate(4.0)
            if len(q) < q.max_tasks and rng.random() < 0.5:
                t = _task(f"r{i}", rng.choice([rng.randint(1, 200), rng.randint(1500, 3000)]))
                info[t.request_id] = (pops, len(q), now, t.work_tokens)
                q.push(t, now=now)
                continue
            waiting = {item.task.request_id for item in q._items.values()}
            item = q.pop(now=now)
            if item is None:
                continue
            pops += 1
            rid = item.task.request_id
            pushed_at, ahead, arrived, _ = info[rid]
            assert pops - pushed_at <= ahead + sched.max_overtakes + 1  # taken within its bound
            for other in waiting - {rid}:  # whoever it passed arrived before it, but not long before
                o_pops, _, o_arrived, o_work = info[other]
                if o_arrived <= arrived and o_pops < pushed_at:
                    assert sched.aging_tokens_per_s == 0 or arrived - o_arrived < o_work / sched.aging_tokens_per_s
        while q.pop(now=now) is not None:  # and everything left drains
            pass
        assert (len(q), q.tokens, q.blocks) == (0, 0, 0)
