"""fast_decide.MaskRanker: the top-k by cost equals a brute-force costing of every worker."""

from __future__ import annotations

import random

from kvrelay.router.fast_decide import MaskRanker
from kvrelay.router.index import PrefixIndex
from kvrelay.router.kv_policy import KvAware
from kvrelay.schemas.hashing import HashSpec
from kvrelay.schemas.kv_events import KvEvent, KvEventBatch

SPEC = HashSpec(4).fingerprint


def _setup(rng: random.Random, workers: int) -> tuple[PrefixIndex, KvAware, list[list[int]]]:
    idx = PrefixIndex(SPEC)
    prompts = [list(range(1000 * p, 1000 * p + 6)) for p in range(1, 4)]
    convs = []
    for c in range(40):
        p = rng.choice(prompts)
        convs.append(p + list(range(100_000 + 100 * c, 100_000 + 100 * c + 10)))
    for i in range(workers):
        mine = [cv for cv in convs if rng.random() < 0.15]
        events = [KvEvent.stored(cv[: rng.randrange(1, len(cv) + 1)]) for cv in mine]
        if events:
            idx.apply(KvEventBatch(worker_id=f"w{i}", epoch=1, event_id=1, spec=SPEC, events=events))
    pol = KvAware(index=idx, block_size=4, seed=1, max_fallbacks=3)
    for i in range(workers):
        pol.ledger.report(f"w{i}", queued_tokens=rng.randrange(0, 200), active=rng.randrange(0, 4))
    return idx, pol, convs


def _ranker(idx: PrefixIndex, pol: KvAware) -> MaskRanker:
    return MaskRanker(idx, pol.ranking, pol.w_prefill, pol.block_size, pol.max_fallbacks, random.Random(1))


def test_fast_decide_rank_equals_brute_force_costs() -> None:
    rng = random.Random(5)
    idx, pol, convs = _setup(rng, 24)
    for _ in range(300):
        q = rng.choice(convs)[: rng.randrange(1, 17)] + [rng.randrange(1 << 40)]
        num_tokens = 4 * len(q) + rng.randrange(4)
        records = idx.match_masks(q)
        overlap = idx.match(q)
        ranked, cached = _ranker(idx, pol).rank(num_tokens, records)
        costs = sorted(max(0.0, num_tokens - 4 * overlap.get(w, 0)) + pol.ranking.cost(w)
                       for _, w in pol.ranking.order)
        assert [c for c, _ in ranked] == costs[: len(ranked)]
        assert len(ranked) == min(4, len(costs))
        best = ranked[0][1]
        assert cached == overlap.get(best, 0)
        assert ranked[0][0] == max(0.0, num_tokens - 4 * cached) + pol.ranking.cost(best)


def test_fast_decide_without_overlap_picks_the_least_loaded() -> None:
    rng = random.Random(9)
    idx, pol, _ = _setup(rng, 8)
    ranked, cached = _ranker(idx, pol).rank(40, idx.match_masks([987654321]))
    assert cached == 0 and ranked[0][0] == 40 + pol.ranking.order[0][0]
