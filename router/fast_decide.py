"""The kv-aware ranking on ``PrefixIndex.match_masks`` records: O(small groups + a short scan).

``KvAware`` cost of a worker: ``w_prefill * max(0, num_tokens - block_size * depth) + load``,
with ``load`` from the policy's ``LoadBoard`` (kept sorted by load). The records group the
workers by matched depth, so one prefill term per group:
- a group of at most ``k = 1 + max_fallbacks`` workers (typically the one or two workers that
  hold a conversation) is costed directly, worker by worker;
- larger groups (a system prompt every worker holds) and the workers holding nothing are
  found by scanning the board in load order, which stops as soon as no worker further on can
  enter the top ``k`` (its load plus the cheapest prefill term left beats the k-th cost).
So a decision touches O(k + workers scanned) workers, not every worker, and allocates only
the top list. Ties at the best cost are broken by the policy's seeded RNG (``_pick``).
"""

from __future__ import annotations

from bisect import insort
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrelay.router.kv_policy import KvAware


def _refresh_bits(p: KvAware) -> None:
    """Cache worker -> slot bit for the board's workers (redone when either side changes)."""
    index = p.index
    assert index is not None
    key = (index.version, p.board.members)
    if p._bits_key != key:
        p._bits = {w: index.bit(w) for w in p.board._loads}
        p._board_mask = sum(p._bits.values())
        p._bits_key = key


def rank_masks(p: KvAware, num_tokens: int, records: list[tuple[int, int]]) -> tuple[list, int]:
    """``[(cost, worker)]`` best first (winner + up to ``max_fallbacks``) and the winner's depth."""
    index, board = p.index, p.board
    if p._bits_key[0] != index.version or p._bits_key[1] != board.members:  # type: ignore[union-attr]
        _refresh_bits(p)
    board_mask, k = p._board_mask, 1 + p.max_fallbacks
    base = p.w_prefill * num_tokens
    per_block = p.w_prefill * p.block_size
    loads, ids = board._loads, index._ids  # type: ignore[union-attr]
    top: list[tuple[float, str]] = []
    ties: list[str] = []
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
            cost = pre + loads[w].load
            if not top or cost < top[0][0]:
                ties = [w]
            elif cost == top[0][0]:
                ties.append(w)
            if len(top) < k or cost < top[-1][0]:
                insort(top, (cost, w))
                del top[k:]
    if not top and not big:
        return p._least_loaded(base), 0
    floor = base
    for _, pre in big:
        if pre < floor:
            floor = pre
    bits = p._bits
    for load, w in board._order:
        if len(top) >= k and load + floor > top[-1][0]:
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
        if not top or cost < top[0][0]:
            ties = [w]
        elif cost == top[0][0]:
            ties.append(w)
        if len(top) < k or cost < top[-1][0]:
            insort(top, (cost, w))
            del top[k:]
    ranked = p._pick(top, ties)
    b = bits[ranked[0][1]]
    for m, d in records:
        if b & m:
            return ranked, d
    return ranked, 0
