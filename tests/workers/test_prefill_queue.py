"""The prefill admission decision and queue: pure logic, no I/O."""

from __future__ import annotations

from kvrelay.schemas.messages import PrefillTask, SamplingSpec
from kvrelay.workers.prefill_queue import PrefillQueue, blocks_for

NOW = 1_000_000


def _task(rid: str, n: int, deadline_ms: int = NOW + 10_000) -> PrefillTask:
    return PrefillTask(request_id=rid, tenant="t", prompt_token_ids=[1] * n, sampling=SamplingSpec(),
                       stream_subject=f"s.{rid}", deadline_ms=deadline_ms)


def test_prefill_queue_is_fifo_and_counts_tokens_and_blocks() -> None:
    q = PrefillQueue(max_tasks=4, max_tokens=100, block_size=4)
    for rid, n in (("a", 5), ("b", 8)):
        assert q.check(_task(rid, n), NOW, False, 100, 0) is None
        q.push(_task(rid, n))
    assert (len(q), q.tokens, q.blocks) == (2, 13, 2 + 2)
    assert q.pop().task.request_id == "a"
    assert (q.tokens, q.blocks) == (8, 2)
    assert q.remove("b").task.request_id == "b" and q.remove("b") is None
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
