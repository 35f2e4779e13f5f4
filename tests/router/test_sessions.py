"""SessionMap, marks and held_blocks: the router's session -> decode worker records. No I/O."""

from __future__ import annotations

import pytest

from kvrelay.router.sessions import Session, SessionMap, held_blocks, marks
from kvrelay.schemas.hashing import HashSpec

SPEC = HashSpec(4)


def test_sessions_marks_recognise_a_prompt_that_continues_the_last_step() -> None:
    step1 = list(range(1, 11))  # 10 tokens: 2 full blocks
    output = [50, 51, 52, 53]
    prompt_h = SPEC.hashes(step1, b"")
    full_h = SPEC.hashes(step1 + output[:-1], b"")  # 13 tokens: 3 full blocks
    rec = Session("d1", 13, marks(prompt_h, full_h))
    assert rec.marks[0][0] == 3 and rec.marks[1][0] == 2  # most blocks first
    assert held_blocks(rec, SPEC.hashes(step1 + output + [7, 8, 9], b"")) == 3
    # the client re-rendered the output differently: only the prompt's blocks are vouched for
    assert held_blocks(rec, SPEC.hashes(step1 + [99, 98, 97, 96], b"")) == 2
    assert held_blocks(rec, SPEC.hashes([9] + step1, b"")) == 0  # another conversation
    assert held_blocks(rec, SPEC.hashes(step1[:5], b"")) == 0  # shorter than any mark
    assert held_blocks(rec, SPEC.hashes(step1, b"other tenant")) == 0


def test_sessions_map_is_lru_bounded_and_scoped_per_tenant() -> None:
    sm = SessionMap(2)
    s = Session("d1", 4, ())
    sm.put("t1", "a", s)
    sm.put("t2", "a", Session("d2", 4, ()))
    assert sm.get("t2", "a").worker == "d2" and sm.get("t1", "a") is s  # t1/a now most recent
    sm.put("t1", "b", s)  # evicts the least recently used: t2/a
    assert sm.get("t2", "a") is None and len(sm) == 2 and sm.evictions == 1
    sm.put("t1", "a", Session("d3", 8, ()))  # an update is not an eviction
    assert sm.get("t1", "a").worker == "d3" and sm.evictions == 1
    with pytest.raises(ValueError):
        SessionMap(0)
