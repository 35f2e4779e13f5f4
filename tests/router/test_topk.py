"""topk: the k cheapest workers, the seeded tie-break at the best cost, softmax sampling."""

from __future__ import annotations

import random

from kvrelay.router.topk import TopK, least_loaded, sample


def test_topk_keeps_the_k_cheapest_and_every_tie_at_the_best() -> None:
    rng = random.Random(4)
    for _ in range(200):
        offers = [(float(rng.randrange(6)), f"w{i}") for i in range(rng.randrange(1, 12))]
        top = TopK(3)
        for cost, w in offers:
            top.offer(cost, w)
        assert [c for c, _ in top.top] == sorted(c for c, _ in offers)[:3]
        assert top.top == sorted(top.top) and set(top.top) <= set(offers)
        best = min(c for c, _ in offers)
        assert top.ties == [w for c, w in offers if c == best]
        assert top.limit == (sorted(offers)[2][0] if len(offers) >= 3 else float("inf"))


def test_topk_pick_draws_only_on_a_tie_and_keeps_the_fallbacks() -> None:
    class NoDraws(random.Random):
        def randrange(self, *a, **k):  # type: ignore[override]
            raise AssertionError("drew without a tie")

    top = TopK(2)
    for cost, w in ((3.0, "b"), (1.0, "a"), (2.0, "c")):
        top.offer(cost, w)
    assert top.pick(NoDraws()) == [(1.0, "a"), (2.0, "c")]
    tied = TopK(2)
    for w in "abcd":
        tied.offer(0.0, w)
    picks = {tied.pick(random.Random(s))[0][1] for s in range(40)}
    assert picks == set("abcd")
    plan = tied.pick(random.Random(1))
    assert len(plan) == 2 and plan[1][1] != plan[0][1]


def test_topk_least_loaded_ties_span_all_equal_loads() -> None:
    order = [(0.0, "a"), (0.0, "b"), (0.0, "c"), (5.0, "d")]
    picks = {least_loaded(order, 10.0, 2, random.Random(s))[0][1] for s in range(40)}
    assert picks == {"a", "b", "c"}
    assert least_loaded(order[2:], 10.0, 2, random.Random(0)) == [(10.0, "c"), (15.0, "d")]


def test_topk_sample_prefers_cheap_workers_but_spreads() -> None:
    rng = random.Random(2)
    costs = [(0.0, "a"), (50.0, "b"), (100.0, "c")]
    firsts = [sample(costs, 0.5, rng, 1)[0][1] for _ in range(300)]
    assert firsts.count("a") > firsts.count("b") > firsts.count("c") > 0
    assert all(len(sample(costs, 0.5, rng, 1)) == 2 for _ in range(10))
