"""Prefix matching over ``hash -> slot bitmask``: the binary-search resolver and the linear walk.

Both answer the same question for a request's chained block hashes ``h_0 .. h_{n-1}``: for every
worker slot, how many leading blocks it holds (``depth``: the first ``k`` whose ``h_k`` it does
not hold). The answer is a list of ``(slot bitmask, depth)`` records, deepest first, masks
disjoint, depths >= 1.

``walk`` is the reference: one dict lookup per block until no worker is left. ``resolve`` needs
the index to be *prefix-closed* per worker (a worker holding ``h_k`` also holds ``h_{k-1}``;
``router.index_store.HolderMap`` keeps it so), under which "worker holds ``h_k``" is monotone
in ``k`` and each group of workers that drop out together is found by a binary search:
O(t * log(n / t)) lookups for ``t`` distinct depths instead of O(n). The lookups are the cost
(a 1M-entry map misses the CPU caches on nearly every one), so fewer lookups is the whole game.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Get = Callable[[int, int], int]


def walk(get: Get, hashes: Sequence[int], usable: int) -> list[tuple[int, int]]:
    """The linear reference: ``(mask, depth)`` records, deepest first."""
    active = usable
    out: list[tuple[int, int]] = []
    depth = 0
    for h in hashes:
        held = get(h, 0) & active
        if held != active:
            if depth:
                out.append((active & ~held, depth))
            active = held
            if not active:
                break
        depth += 1
    if active and depth:
        out.append((active, depth))
    out.reverse()
    return out


def resolve(get: Get, hashes: Sequence[int], first: int) -> list[tuple[int, int]]:
    """Binary-search resolution, given ``first = get(h_0) & usable`` (non-zero).

    Invariant of every range ``(lo, hi, mask)``: each worker in ``mask`` holds ``h_0 .. h_{lo-1}``
    and its depth is at most ``hi``. Probing ``h_{mid-1}`` splits the mask into the workers that
    reach ``mid`` and those that stop below it; the deeper part is followed first and the other
    is stacked, so records come out deepest first.
    """
    out: list[tuple[int, int]] = []
    stack: list[tuple[int, int, int]] = []
    lo, hi, mask = 1, len(hashes), first
    while True:
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            deeper = get(hashes[mid - 1], 0) & mask
            if deeper:
                if deeper != mask:
                    stack.append((lo, mid - 1, mask ^ deeper))
                    mask = deeper
                lo = mid
            else:
                hi = mid - 1
        out.append((mask, lo))
        if not stack:
            return out
        lo, hi, mask = stack.pop()
