"""PrefixIndex: matching, refcounts, event ids and gaps, snapshots, workers, the LRU cap."""

from __future__ import annotations

import pytest

from kvrelay.router.index import IndexFull, PrefixIndex
from kvrelay.schemas.hashing import HashSpec, HashSpecMismatch
from kvrelay.schemas.kv_events import KvEvent, KvEventBatch

SPEC = HashSpec(4).fingerprint
OTHER = HashSpec(8).fingerprint


pytestmark = pytest.mark.usefixtures("index_impl")  # each test on the C storage and on the Python one


class Worker:
    """Numbers batches like a real worker: 1, 2, ... per epoch."""

    def __init__(self, wid: str, epoch: int = 1) -> None:
        self.wid, self.epoch, self.next = wid, epoch, 1

    def batch(self, *events: KvEvent, event_id: int | None = None, spec: str = SPEC) -> KvEventBatch:
        eid = self.next if event_id is None else event_id
        self.next = eid + 1
        return KvEventBatch(worker_id=self.wid, epoch=self.epoch, event_id=eid, spec=spec,
                            events=list(events))


def stored(*hashes: int) -> KvEvent:
    return KvEvent.stored(list(hashes))


def removed(*hashes: int) -> KvEvent:
    return KvEvent.removed(list(hashes))


def test_index_match_counts_leading_blocks_per_worker() -> None:
    idx, a, b = PrefixIndex(SPEC), Worker("a"), Worker("b")
    idx.apply(a.batch(stored(1, 2, 3, 4)))
    idx.apply(b.batch(stored(1, 2, 9)))
    assert idx.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert idx.match([1, 2, 9]) == {"a": 2, "b": 3}
    assert idx.match([7, 1, 2]) == {}
    assert idx.match([]) == {}


def test_index_match_stops_at_first_missing_block() -> None:
    idx, a = PrefixIndex(SPEC), Worker("a")
    idx.apply(a.batch(stored(1, 3)))  # holds 1 and 3 but not 2
    assert idx.match([1, 2, 3]) == {"a": 1}


def test_index_match_masks_agree_with_match() -> None:
    idx = PrefixIndex(SPEC)
    for wid, hs in (("a", (1, 2, 3)), ("b", (1, 2)), ("c", (1,)), ("d", (1, 2))):
        idx.apply(Worker(wid).batch(stored(*hs)))
    records = idx.match_masks([1, 2, 3, 4])
    assert [d for _, d in records] == [3, 2, 1]  # deepest first
    assert records[1][0] == idx.bit("b") | idx.bit("d")
    assert idx.bit("zzz") == 0


def test_index_refcounts_double_store_and_remove() -> None:
    idx, a = PrefixIndex(SPEC), Worker("a")
    idx.apply(a.batch(stored(1, 2)))
    idx.apply(a.batch(stored(1, 2)))
    idx.apply(a.batch(removed(1, 2)))
    assert idx.match([1, 2]) == {"a": 2}  # one reference left
    idx.apply(a.batch(removed(1, 2)))
    assert idx.match([1, 2]) == {}
    assert len(idx) == 0 and idx.stats()["entries"] == 0


def test_index_remove_of_unknown_hash_is_counted_not_fatal() -> None:
    idx, a = PrefixIndex(SPEC), Worker("a")
    res = idx.apply(a.batch(removed(42)))
    assert res.status == "applied" and idx.counters["unknown_removes"] == 1


def test_index_remove_keeps_other_holders() -> None:
    idx, a, b = PrefixIndex(SPEC), Worker("a"), Worker("b")
    idx.apply(a.batch(stored(1, 2)))
    idx.apply(b.batch(stored(1, 2)))
    idx.apply(a.batch(removed(2)))
    assert idx.match([1, 2]) == {"a": 1, "b": 2}


def test_index_cleared_drops_only_that_worker() -> None:
    idx, a, b = PrefixIndex(SPEC), Worker("a"), Worker("b")
    idx.apply(a.batch(stored(1, 2)))
    idx.apply(b.batch(stored(1)))
    idx.apply(a.batch(KvEvent.cleared()))
    assert idx.match([1, 2]) == {"b": 1}
    assert idx.stats()["held"] == {"a": 0, "b": 1}


def test_index_duplicate_event_ids_are_ignored() -> None:
    idx, a = PrefixIndex(SPEC), Worker("a")
    first = a.batch(stored(1))
    idx.apply(first)
    idx.apply(a.batch(removed(1)))
    res = idx.apply(first)  # redelivered
    assert res.status == "duplicate" and idx.match([1]) == {}
    assert idx.counters["duplicates"] == 1


def test_index_gap_marks_worker_stale_and_asks_for_resync() -> None:
    idx, a, b = PrefixIndex(SPEC), Worker("a"), Worker("b")
    idx.apply(a.batch(stored(1, 2)))
    idx.apply(b.batch(stored(1)))
    res = idx.apply(a.batch(stored(3), event_id=3))  # id 2 was lost
    assert res.status == "gap" and res.resync
    assert idx.is_stale("a") and idx.stats()["stale_workers"] == ["a"]
    assert idx.match([1, 2, 3]) == {"b": 1}  # a is ignored until its snapshot
    assert idx.apply(a.batch(stored(4))).status == "stale"  # held, not applied


def test_index_snapshot_restores_a_stale_worker_and_replays_held_batches() -> None:
    idx, a = PrefixIndex(SPEC), Worker("a")
    idx.apply(a.batch(stored(1, 2)))
    idx.apply(a.batch(stored(3), event_id=3))  # gap: id 2 lost
    idx.apply(a.batch(stored(4)))  # id 4, held while stale
    # the worker's state after event 3: it had removed 2 in the lost event 2
    res = idx.apply_snapshot("a", SPEC, 1, 3, [1, 3])
    assert res.status == "applied" and not res.resync and not idx.is_stale("a")
    assert sorted(idx.snapshot("a")) == [1, 3, 4]  # event 4 replayed on top
    assert idx.last_event("a") == (1, 4)
    assert idx.apply(a.batch(stored(5))).status == "applied"


def test_index_snapshot_with_remaining_gap_asks_again() -> None:
    idx, a = PrefixIndex(SPEC), Worker("a")
    idx.apply(a.batch(stored(1)))
    idx.apply(a.batch(stored(9), event_id=9))  # gap, held
    res = idx.apply_snapshot("a", SPEC, 1, 5, [1])  # snapshot as of 5; 6..8 still missing
    assert res.status == "gap" and res.resync and idx.is_stale("a")


def test_index_new_epoch_resets_the_worker() -> None:
    idx, a = PrefixIndex(SPEC), Worker("a")
    idx.apply(a.batch(stored(1, 2)))
    restarted = Worker("a", epoch=2)
    res = idx.apply(restarted.batch(stored(7)))
    assert res.status == "applied" and idx.snapshot("a") == [7]


def test_index_late_join_needs_a_snapshot() -> None:
    idx = PrefixIndex(SPEC)
    res = idx.apply(Worker("a").batch(stored(7), event_id=40))  # router started after event 39
    assert res.status == "gap" and res.resync and idx.match([7]) == {}
    res = idx.apply_snapshot("a", SPEC, 1, 40, [6, 7])
    assert res.status == "applied" and idx.match([6, 7]) == {"a": 2}


def test_index_rejects_mismatched_hash_spec_loudly() -> None:
    idx = PrefixIndex(SPEC)
    with pytest.raises(HashSpecMismatch):
        idx.add_worker("a", OTHER)
    res = idx.apply(Worker("b").batch(stored(1), spec=OTHER))
    assert res.status == "rejected" and "bs=8" in res.reason
    assert idx.counters["spec_mismatches"] == 2 and idx.match([1]) == {}
    idx.add_worker("c", SPEC)
    assert idx.apply(Worker("c").batch(stored(1), spec=OTHER)).status == "rejected"
    assert idx.apply_snapshot("c", OTHER, 1, 1, [1]).status == "rejected"


def test_index_remove_worker_drops_its_entries_and_frees_the_slot() -> None:
    idx, a, b = PrefixIndex(SPEC, max_workers=2), Worker("a"), Worker("b")
    idx.apply(a.batch(stored(1, 2)))
    idx.apply(b.batch(stored(1)))
    with pytest.raises(IndexFull):
        idx.add_worker("c", SPEC)
    assert idx.remove_worker("a") and not idx.remove_worker("a")
    assert idx.match([1, 2]) == {"b": 1} and len(idx) == 1
    assert idx.add_worker("c", SPEC)
    assert idx.match([1]) == {"b": 1}  # the reused slot carries nothing of a


def test_index_lru_cap_evicts_least_recently_used_leaves() -> None:
    idx, a, b = PrefixIndex(SPEC, max_blocks=4), Worker("a"), Worker("b")
    idx.apply(a.batch(stored(1, 2)))
    idx.apply(b.batch(stored(7, 8)))
    assert idx.match([1, 2]) == {"a": 2}  # 1 and 2 are now more recent than 7 and 8
    idx.apply(a.batch(stored(3)))  # evicts 8 (applies the match's recency first): a leaf
    assert len(idx) == 4 and idx.counters["evictions"] == 1
    assert set(idx.snapshot("b")) == {7}
    assert idx.stats()["held"]["b"] == 1
    idx.apply(b.batch(removed(8)))  # the worker evicts it too: counted, harmless
    assert idx.counters["unknown_removes"] == 1


def test_index_lru_cap_never_evicts_a_block_above_a_held_one() -> None:
    idx, a = PrefixIndex(SPEC, max_blocks=3), Worker("a")
    idx.apply(a.batch(stored(1, 2)))
    idx.apply(a.batch(KvEvent.stored([3], parent=2)))  # 3 is newer than its ancestors 1 and 2
    idx.apply(a.batch(stored(9)))  # the oldest leaf is 3, not 1
    assert idx.match([1, 2, 3]) == {"a": 2}
    assert idx.match_masks([1, 2, 3]) == idx.match_masks_linear([1, 2, 3])


def test_index_eviction_drops_extra_references() -> None:
    idx, a = PrefixIndex(SPEC, max_blocks=1), Worker("a")
    idx.apply(a.batch(stored(1), stored(1)))
    idx.apply(a.batch(stored(2)))  # evicts 1 with both references
    idx.apply(a.batch(stored(1)))  # evicts 2
    idx.apply(a.batch(removed(1)))
    assert idx.match([1]) == {}


def test_index_pending_batches_are_bounded() -> None:
    idx, a = PrefixIndex(SPEC, max_pending=2), Worker("a")
    idx.apply(a.batch(stored(1), event_id=5))  # late join: stale
    for _ in range(3):
        idx.apply(a.batch(stored(1)))
    assert idx.counters["pending_dropped"] == 2


def test_index_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(SPEC, max_blocks=0)


def test_index_snapshot_counts_repeated_hashes() -> None:
    idx, a = PrefixIndex(SPEC), Worker("a")
    idx.apply_snapshot("a", SPEC, 1, 0, [5, 5, 6])  # 5 held twice
    idx.apply(a.batch(removed(5)))
    assert idx.match([5, 6]) == {"a": 2}
    idx.apply(a.batch(removed(5)))
    assert idx.match([5, 6]) == {}


def test_index_evicts_in_chunks_of_a_64th_of_the_cap() -> None:
    idx, a = PrefixIndex(SPEC, max_blocks=128), Worker("a")
    idx.apply(a.batch(stored(*range(1, 129))))
    idx.apply(a.batch(stored(1000)))
    assert len(idx) == 127 and idx.counters["evictions"] == 2
    assert idx.match(list(range(1, 129))) == {"a": 126}  # the two oldest leaves went: 128, 127

