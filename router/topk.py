"""Choosing the cheapest workers: the top ``k`` by cost, a seeded random tie-break at the best
cost, or (``temperature > 0``) a softmax sample. Pure; every ranking path uses these.

A plan is ``[(cost, worker)]``: the winner first, then up to ``k - 1`` fallbacks, cheapest first.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right, insort
from collections.abc import Sequence

INF = float("inf")


class TopK:
    """The ``k`` cheapest offers (ties by worker id) and every worker tied at the best cost.

    ``limit`` is the k-th cost (infinite until ``k`` offers): an offer above it changes nothing,
    so a scan in ascending load order can stop once ``load + cheapest term left > limit``.
    """

    __slots__ = ("k", "top", "ties", "limit")

    def __init__(self, k: int) -> None:
        self.k = k
        self.top: list[tuple[float, str]] = []
        self.ties: list[str] = []
        self.limit = INF

    def offer(self, cost: float, worker: str) -> None:
        top = self.top
        if not top or cost < top[0][0]:
            self.ties = [worker]
        elif cost == top[0][0]:
            self.ties.append(worker)
        if len(top) < self.k:
            insort(top, (cost, worker))
            if len(top) == self.k:
                self.limit = top[-1][0]
        elif cost < self.limit:
            insort(top, (cost, worker))
            top.pop()
            self.limit = top[-1][0]

    def pick(self, rng: random.Random) -> list[tuple[float, str]]:
        """The plan: a tie at the best cost is broken by ``rng`` (drawn only when there is one)."""
        return pick(self.top, self.ties, rng, self.k - 1)


def pick(top: list[tuple[float, str]], ties: list[str], rng: random.Random,
         max_fallbacks: int) -> list[tuple[float, str]]:
    if len(ties) < 2:
        return top
    choice = ties[rng.randrange(len(ties))]
    best = top[0][0]
    return [(best, choice)] + [t for t in top if t[1] != choice][:max_fallbacks]


def least_loaded(order: Sequence[tuple[float, str]], base: float, k: int,
                 rng: random.Random) -> list[tuple[float, str]]:
    """The plan when no worker holds any of the prompt: ``order`` is ``[(load, worker)]``
    ascending, every worker's cost is ``base + load``."""
    low = order[0][0]
    run = bisect_right(order, (low, "\U0010ffff"))
    top = [(base + load, w) for load, w in order[: max(k, 1)]]
    ties = [w for _, w in order[:run]] if run > 1 else [order[0][1]]
    return pick(top, ties, rng, k - 1)


def sample(costs: list[tuple[float, str]], temperature: float, rng: random.Random,
           max_fallbacks: int) -> list[tuple[float, str]]:
    """Softmax over every worker's cost: p ~ exp(-(c - c_min) / (T * max(1, c_max - c_min)))."""
    lo = costs[0][0] if len(costs) == 1 else min(c for c, _ in costs)
    scale = temperature * max(1.0, max(c for c, _ in costs) - lo)
    weights = [math.exp(-(c - lo) / scale) for c, _ in costs]
    choice = rng.choices(range(len(costs)), weights=weights)[0]
    rest = sorted(costs[:choice] + costs[choice + 1:])
    return [costs[choice]] + rest[:max_fallbacks]
