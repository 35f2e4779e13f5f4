"""BlockManager: prefix hits, refcounts, LRU eviction order, bounds, and events that match the state."""

from __future__ import annotations

from collections import Counter

import pytest

from kvrelay.router.index import PrefixIndex
from kvrelay.schemas.hashing import HashSpec
from kvrelay.schemas.kv_events import KvEventBatch
from kvrelay.workers.sim.blocks import BadAllocation, BlockManager, BlocksFull

BS = 4
SPEC = HashSpec(BS)


def _prompt(tag: int, n: int) -> list[int]:
    return [tag * 1000 + i for i in range(n)]


def _replay(bm: BlockManager) -> Counter:
    """Apply every pending batch in order: the multiset of hashes the events say are held."""
    held: Counter = Counter()
    while (batch := bm.take_batch(max_events=3)) is not None:
        for ev in batch.events:
            if ev.kind == "stored":
                held.update(ev.block_hashes)
            elif ev.kind == "removed":
                held.subtract(ev.block_hashes)
            else:
                held.clear()
    return +held


def test_block_manager_reuses_cached_prefix() -> None:
    bm = BlockManager(16, BS)
    a = _prompt(1, 10)  # 2 full blocks + 2 tokens
    assert bm.allocate("a", SPEC.hashes(a), len(a)) == 0
    bm.free("a")
    b = a[:8] + _prompt(2, 5)  # same 2 leading blocks, then new ones
    assert bm.allocate("b", SPEC.hashes(b), len(b)) == 8
    assert bm.counters["hit_blocks"] == 2


def test_block_manager_always_computes_last_prompt_token() -> None:
    bm = BlockManager(8, BS)
    p = _prompt(1, 8)
    bm.allocate("a", SPEC.hashes(p), len(p))
    bm.free("a")
    assert bm.allocate("b", SPEC.hashes(p), len(p)) == 7


def test_block_manager_shares_referenced_blocks_and_counts_references() -> None:
    bm = BlockManager(6, BS)
    p = _prompt(1, 8)
    bm.allocate("a", SPEC.hashes(p), len(p))
    assert bm.allocate("b", SPEC.hashes(p), len(p)) == 7
    assert bm.used_blocks == 2  # both requests use the same 2 blocks
    bm.free("a")
    assert bm.used_blocks == 2  # still referenced by b
    with pytest.raises(BlocksFull):  # 5 new blocks wanted; 4 free, b's blocks cannot be evicted
        bm.allocate("c", SPEC.hashes(_prompt(2, 20)), 20)
    bm.free("b")
    assert bm.used_blocks == 0 and bm.free_blocks == 6


def test_block_manager_evicts_least_recently_used_deepest_first() -> None:
    bm = BlockManager(4, BS)
    old, new = _prompt(1, 8), _prompt(2, 8)
    ho, hn = SPEC.hashes(old), SPEC.hashes(new)
    bm.allocate("old", ho, 8)
    bm.free("old")
    bm.allocate("new", hn, 8)
    bm.free("new")
    bm.allocate("x", SPEC.hashes(_prompt(3, 4)), 4)  # one block: evicts old's deepest block
    assert ho[1] not in bm.held() and ho[0] in bm.held() and set(hn) <= set(bm.held())
    assert bm.cached_blocks(ho) == 1
    bm.allocate("y", SPEC.hashes(_prompt(4, 4)), 4)  # then old's first block, never new's
    assert bm.cached_blocks(ho) == 0 and bm.cached_blocks(hn) == 2


def test_block_manager_hit_refreshes_recency() -> None:
    bm = BlockManager(4, BS)
    a, b = _prompt(1, 8), _prompt(2, 8)
    for rid, p in (("a", a), ("b", b)):
        bm.allocate(rid, SPEC.hashes(p), 8)
        bm.free(rid)
    bm.allocate("a2", SPEC.hashes(a), 8)  # a is now the most recent
    bm.free("a2")
    bm.allocate("c", SPEC.hashes(_prompt(3, 8)), 8)
    assert bm.cached_blocks(SPEC.hashes(a)) == 2 and bm.cached_blocks(SPEC.hashes(b)) == 0


def test_block_manager_full_changes_nothing() -> None:
    bm = BlockManager(3, BS)
    bm.allocate("a", SPEC.hashes(_prompt(1, 8)), 8)
    held, free = bm.held(), bm.free_blocks
    with pytest.raises(BlocksFull) as err:
        bm.allocate("b", SPEC.hashes(_prompt(2, 8)), 8)
    assert err.value.needed == 2 and err.value.available == 1
    assert bm.held() == held and bm.free_blocks == free and "b" not in bm


def test_block_manager_rejects_bad_arguments() -> None:
    bm = BlockManager(8, BS)
    with pytest.raises(BadAllocation):
        bm.allocate("a", [], 0)
    with pytest.raises(BadAllocation):
        bm.allocate("a", [1, 2, 3], 8)  # 3 hashes for 2 full blocks
    bm.allocate("a", [], 3)
    with pytest.raises(BadAllocation):
        bm.allocate("a", [], 3)
    assert bm.free("a") and not bm.free("a")  # idempotent


def test_block_manager_events_match_the_state() -> None:
    bm = BlockManager(10, BS, worker_id="w", spec=SPEC.fingerprint, epoch=3)
    prompts = [_prompt(i % 4, 6 + 5 * i) for i in range(8)]
    for i, p in enumerate(prompts):
        try:
            bm.allocate(f"r{i}", SPEC.hashes(p), len(p))
        except BlocksFull:
            continue
        if i % 2:
            bm.free(f"r{i}")
        if i % 3 == 2:
            for rid in [f"r{j}" for j in range(i + 1)]:
                bm.free(rid)
    assert bm.counters["evicted_blocks"] > 0
    assert _replay(bm) == Counter(bm.held())


def test_block_manager_batches_feed_the_prefix_index() -> None:
    bm = BlockManager(8, BS, worker_id="w", spec=SPEC.fingerprint, epoch=1)
    idx = PrefixIndex(SPEC.fingerprint)
    p = _prompt(1, 12)
    bm.allocate("a", SPEC.hashes(p), 12)
    bm.free("a")
    bm.allocate("b", SPEC.hashes(_prompt(2, 24)), 24)  # evicts 1 of a's 3 blocks
    ids = []
    while (batch := bm.take_batch(max_events=1)) is not None:
        ids.append(batch.event_id)
        assert idx.apply(batch).status == "applied"
    assert ids == [1, 2, 3] and bm.last_event_id == 3
    assert idx.match(SPEC.hashes(p)) == {"w": bm.cached_blocks(SPEC.hashes(p))} == {"w": 2}


def test_block_manager_drops_events_past_the_bound_and_skips_an_id() -> None:
    bm = BlockManager(64, BS, max_pending_events=2)
    for i in range(3):
        bm.allocate(f"r{i}", SPEC.hashes(_prompt(i, 4)), 4)
    assert bm.counters["dropped_events"] == 1
    batch = bm.take_batch()
    assert batch is None  # the pending events were dropped with the id: a router resyncs
    bm.allocate("r9", SPEC.hashes(_prompt(9, 4)), 4)
    nxt = bm.take_batch()
    assert isinstance(nxt, KvEventBatch) and nxt.event_id == 2  # id 1 is the gap


def test_block_manager_clear_emits_cleared_and_needs_idle() -> None:
    bm = BlockManager(8, BS)
    bm.allocate("a", SPEC.hashes(_prompt(1, 8)), 8)
    with pytest.raises(BadAllocation):
        bm.clear()
    bm.free("a")
    bm.clear()
    assert bm.held() == [] and bm.free_blocks == 8
    assert _replay(bm) == Counter()


def test_block_manager_sink_receives_events_instead_of_batches() -> None:
    got = []
    bm = BlockManager(8, BS, sink=got.append)
    bm.allocate("a", SPEC.hashes(_prompt(1, 8)), 8)
    assert [e.kind for e in got] == ["stored"] and got[0].parent is None
    assert bm.take_batch() is None
