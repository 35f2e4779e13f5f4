"""The kv-aware ranking on ``PrefixIndex.match_masks`` records: O(small groups + a short scan).

``KvAware`` cost of a worker: ``w_prefill * max(0, num_tokens - block_size * depth) + load``,
with ``load`` from the ledger's ``Ranking`` (kept sorted by load). The records group the
workers by matched depth, so one prefill term per group:
- a group of at most ``k = 1 + max_fallbacks`` workers (typically the one or two workers that
  hold a conversation) is costed directly, worker by worker;
- larger groups (a system prompt every worker holds) and the workers holding nothing are
  found by scanning the ranking in load order, which stops as soon as no worker further on can
  enter the top ``k`` (its load plus the cheapest prefill term left beats the k-th cost).
So a decision touches O(k + workers scanned) workers, not every worker, and allocates only
the top list. Ties at the best cost are broken by the seeded RNG (``router.topk``).
"""

from __future__ import annotations

import random

from kvrelay.router.index import PrefixIndex
from kvrelay.router.ledger import Ranking
from kvrelay.router.topk import TopK, least_loaded


class MaskRanker:
    """Ranks the ranking's workers on match records; caches worker -> slot bit (redone when the
    index's slots or the ranking's members change)."""

    def __init__(self, index: PrefixIndex, ranking: Ranking, w_prefill: float, block_size: int,
                 max_fallbacks: int, rng: random.Random) -> None:
        self.index, self.ranking = index, ranking
        self.w_prefill, self.block_size, self.k, self.rng = w_prefill, block_size, 1 + max_fallbacks, rng
        self.bits: dict[str, int] = {}
        self.mask = 0  # every ranked worker's bit
        self._key = (-1, -1)

    def refresh(self) -> None:
        """Bring ``bits`` and ``mask`` up to date with the index and the ranking."""
        key = (self.index.version, self.ranking.members)
        if self._key != key:
            bit = self.index.bit
            self.bits = {w: bit(w) for w in self.ranking.costs}
            self.mask = sum(self.bits.values())
            self._key = key

    def depth(self, worker_id: str, records: list[tuple[int, int]]) -> int:
        """Leading blocks ``worker_id`` holds according to ``records`` (0: none)."""
        bit = self.index.bit(worker_id)
        if bit:
            for mask, depth in records:
                if bit & mask:
                    return depth
        return 0

    def rank(self, num_tokens: int, records: list[tuple[int, int]]) -> tuple[list[tuple[float, str]], int]:
        """``[(cost, worker)]`` best first (winner + up to ``max_fallbacks``) and the winner's depth."""
        key = self._key
        if key[0] != self.index.version or key[1] != self.ranking.members:
            self.refresh()
        base = self.w_prefill * num_tokens
        top = TopK(self.k)
        small, big = self._groups(base, records, top)
        if not top.top and not big:
            return least_loaded(self.ranking.order, base, self.k, self.rng), 0
        self._scan(base, small, big, top)
        ranked = top.pick(self.rng)
        b = self.bits[ranked[0][1]]
        for m, d in records:
            if b & m:
                return ranked, d
        return ranked, 0

    def _groups(self, base: float, records: list[tuple[int, int]],
                top: TopK) -> tuple[int, list[tuple[int, float]]]:
        """Cost the small groups into ``top``; returns their bits and the big groups (mask, term)."""
        board_mask, k, ids, costs = self.mask, self.k, self.index.slot_ids, self.ranking.costs
        per_block = self.w_prefill * self.block_size
        small = 0
        big: list[tuple[int, float]] = []
        for m, d in records:
            m &= board_mask
            if not m:
                continue
            pre = base - per_block * d
            if pre < 0.0:
                pre = 0.0
            if m.bit_count() > k:
                big.append((m, pre))
                continue
            small |= m
            while m:
                low = m & -m
                m ^= low
                w = ids[low.bit_length() - 1]
                cost = pre + costs[w]
                if cost <= top.limit:
                    top.offer(cost, w)
        return small, big

    def _scan(self, base: float, small: int, big: list[tuple[int, float]], top: TopK) -> None:
        """The big groups and the workers holding nothing, in load order, until none can enter."""
        floor = base
        for _, pre in big:
            if pre < floor:
                floor = pre
        bits = self.bits
        for load, w in self.ranking.order:
            if load + floor > top.limit:
                break
            b = bits[w]
            if b & small:
                continue
            pre = base
            for m, mpre in big:
                if b & m:
                    pre = mpre
                    break
            cost = pre + load
            if cost <= top.limit:
                top.offer(cost, w)
