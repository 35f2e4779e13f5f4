"""PinTable: which finished requests' blocks a decode engine keeps for their session's next step."""

from __future__ import annotations

import pytest

from kvrelay.workers.vllm_engine.pins import PinTable


def test_pins_next_step_of_the_session_ends_its_pin_as_a_hit() -> None:
    t = PinTable(max_blocks=100, max_sessions=4, max_ttl_ms=60_000)
    assert t.offer("a", "r1", 10, 30_000, now_ms=0).pinned
    assert t.arrive("b") == []
    assert t.arrive("a") == [("r1", "hit", 10)]
    assert len(t) == 0 and t.blocks == 0


def test_pins_expire_at_their_ttl_capped_by_the_maximum() -> None:
    t = PinTable(max_blocks=100, max_sessions=4, max_ttl_ms=5_000)
    t.offer("short", "r1", 1, 1_000, now_ms=0)
    t.offer("long", "r2", 1, 60_000, now_ms=0)  # capped at 5 s
    assert t.expire(999) == []
    assert t.expire(1_000) == [("r1", "expired", 1)]
    assert t.expire(5_000) == [("r2", "expired", 1)]


def test_pins_over_the_block_budget_evict_the_oldest_first() -> None:
    t = PinTable(max_blocks=10, max_sessions=8, max_ttl_ms=60_000)
    t.offer("a", "r1", 4, 1_000, 0)
    t.offer("b", "r2", 4, 1_000, 0)
    decision = t.offer("c", "r3", 5, 1_000, 0)
    assert decision.pinned and decision.ended == [("r1", "evicted", 4)]
    assert t.blocks == 9


def test_pins_over_the_session_budget_evict_the_oldest_first() -> None:
    t = PinTable(max_blocks=100, max_sessions=2, max_ttl_ms=60_000)
    t.offer("a", "r1", 1, 1_000, 0)
    t.offer("b", "r2", 1, 1_000, 0)
    assert t.offer("c", "r3", 1, 1_000, 0).ended == [("r1", "evicted", 1)]
    assert len(t) == 2


def test_pins_refuse_a_step_bigger_than_the_budget_and_keep_the_others() -> None:
    t = PinTable(max_blocks=10, max_sessions=2, max_ttl_ms=60_000)
    t.offer("a", "r1", 5, 1_000, 0)
    decision = t.offer("b", "r2", 11, 1_000, 0)
    assert not decision.pinned and decision.ended == []
    assert t.blocks == 5


def test_pins_a_newer_step_of_the_same_session_replaces_the_older() -> None:
    t = PinTable(max_blocks=10, max_sessions=2, max_ttl_ms=60_000)
    t.offer("a", "r1", 3, 1_000, 0)
    assert t.offer("a", "r2", 4, 1_000, 0).ended == [("r1", "replaced", 3)]
    assert t.blocks == 4 and t.arrive("a") == [("r2", "hit", 4)]


def test_pins_zero_ttl_or_zero_budget_never_pin() -> None:
    assert not PinTable(10, 2, 60_000).offer("a", "r1", 1, 0, 0).pinned
    assert not PinTable(0, 2, 60_000).offer("a", "r1", 1, 1_000, 0).pinned
    assert not PinTable(10, 0, 60_000).offer("a", "r1", 1, 1_000, 0).pinned


def test_pins_reject_negative_limits() -> None:
    with pytest.raises(ValueError):
        PinTable(-1, 1, 1)
