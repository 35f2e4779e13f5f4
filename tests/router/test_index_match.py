"""Binary-search matching: equal to the linear walk, through stores, removals, the LRU cap and snapshots."""

from __future__ import annotations

import random

import pytest

from kvrelay.router.index import PrefixIndex
from kvrelay.router.index_match import resolve, walk
from kvrelay.schemas.hashing import HashSpec
from kvrelay.schemas.kv_events import KvEvent, KvEventBatch

SPEC = HashSpec(4).fingerprint


pytestmark = pytest.mark.usefixtures("index_impl")  # each test on the C storage and on the Python one


class Worker:
    def __init__(self, wid: str) -> None:
        self.wid, self.next = wid, 1

    def batch(self, *events: KvEvent) -> KvEventBatch:
        self.next += 1
        return KvEventBatch(worker_id=self.wid, epoch=1, event_id=self.next - 1, spec=SPEC, events=list(events))


def _chains(rng: random.Random, n: int, depth: int) -> list[list[int]]:
    """Chains sharing prefixes (a few roots, branching), hashes unique per position."""
    chains: list[list[int]] = []
    nxt = 1
    for _ in range(n):
        base = rng.choice(chains)[: rng.randrange(depth)] if chains and rng.random() < 0.7 else []
        own = list(range(nxt, nxt + depth - len(base)))
        nxt += len(own)
        chains.append(base + own)
    return chains


def test_resolve_equals_walk_on_prefix_closed_maps() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randrange(1, 40)
        hashes = list(range(100, 100 + n))
        depth_of = {slot: rng.randrange(0, n + 1) for slot in range(rng.randrange(1, 12))}
        holders: dict[int, int] = {}
        for slot, d in depth_of.items():
            for h in hashes[:d]:
                holders[h] = holders.get(h, 0) | 1 << slot
        usable = sum(1 << s for s in depth_of)
        first = holders.get(hashes[0], 0) & usable
        expected = walk(holders.get, hashes, usable)
        assert (resolve(holders.get, hashes, first) if first else []) == expected


def _check_all(idx: PrefixIndex, queries: list[list[int]]) -> None:
    for q in queries:
        for cut in (len(q), len(q) // 2, 1):
            assert idx.match_masks(q[:cut]) == idx.match_masks_linear(q[:cut]), q[:cut]


def test_index_binary_match_equals_linear_walk_through_random_churn() -> None:
    rng = random.Random(3)
    chains = _chains(rng, 60, 24)
    workers = [Worker(f"w{i}") for i in range(10)]
    idx = PrefixIndex(SPEC, max_blocks=120)  # small: the LRU cap evicts throughout
    held: list[set[int]] = [set() for _ in workers]
    for step in range(600):
        i = rng.randrange(len(workers))
        w, chain = workers[i], rng.choice(chains)
        roll = rng.random()
        if roll < 0.55:  # store a chain, or its continuation under a block it may hold
            have = next((k for k, h in enumerate(chain) if h not in held[i]), len(chain))
            start = rng.choice((0, have, have, rng.randrange(len(chain))))
            if start >= len(chain):
                continue
            parent = chain[start - 1] if start else None
            idx.apply(w.batch(KvEvent.stored(chain[start:], parent=parent)))
            held[i].update(chain[start:])
        elif roll < 0.9 and held[i]:  # remove anything, intermediate blocks included (holes)
            gone = rng.sample(sorted(held[i]), min(len(held[i]), rng.randrange(1, 6)))
            idx.apply(w.batch(KvEvent.removed(gone)))
            held[i].difference_update(gone)
        elif roll < 0.95:
            idx.apply(w.batch(KvEvent.cleared()))
            held[i].clear()
        if step % 25 == 0:
            _check_all(idx, chains)
    _check_all(idx, chains)
    assert idx.counters["evictions"] > 0 and idx.counters["cascaded_blocks"] > 0


def test_index_removing_an_intermediate_block_stops_the_match_there() -> None:
    idx, a, b = PrefixIndex(SPEC), Worker("a"), Worker("b")
    idx.apply(a.batch(KvEvent.stored([1, 2, 3, 4, 5, 6, 7, 8])))
    idx.apply(b.batch(KvEvent.stored([1, 2, 3, 4, 5, 6])))
    idx.apply(a.batch(KvEvent.removed([4])))  # a hole for a: 5.. are unreachable for it
    q = [1, 2, 3, 4, 5, 6, 7, 8]
    assert idx.match(q) == {"a": 3, "b": 6}
    assert idx.match_masks(q) == idx.match_masks_linear(q)
    assert idx.counters["cascaded_blocks"] == 4  # 5, 6, 7, 8 cleared for a
    assert sorted(idx.snapshot("a")) == [1, 2, 3]


def test_index_chain_under_a_parent_the_worker_lacks_is_skipped() -> None:
    idx, a = PrefixIndex(SPEC), Worker("a")
    idx.apply(a.batch(KvEvent.stored([1, 2])))
    res = idx.apply(a.batch(KvEvent.stored([10, 11], parent=9)))
    assert res.status == "applied" and idx.counters["orphan_blocks"] == 2
    assert idx.match([1, 2]) == {"a": 2} and 10 not in idx.snapshot("a")


def test_index_snapshot_workers_are_matched_by_the_walk() -> None:
    idx, b = PrefixIndex(SPEC), Worker("b")
    idx.apply_snapshot("a", SPEC, 1, 0, [1, 3, 4])  # a hole at 2: no links to tell
    idx.apply(b.batch(KvEvent.stored([1, 2, 3])))
    assert idx.match([1, 2, 3, 4]) == {"a": 1, "b": 3}
    assert idx.match_masks([1, 2, 3, 4]) == idx.match_masks_linear([1, 2, 3, 4])


def test_index_eviction_keeps_inner_blocks_while_children_are_indexed() -> None:
    idx, a = PrefixIndex(SPEC, max_blocks=64), Worker("a")
    idx.apply(a.batch(KvEvent.stored(list(range(1, 33)))))
    for k in range(40):  # continuations, each newer than the chain it hangs from
        idx.apply(a.batch(KvEvent.stored([1000 + k], parent=32)))
    assert len(idx) <= 64 and idx.counters["evictions"] > 0
    assert idx.match(list(range(1, 33))) == {"a": 32}  # never a hole above a held block
