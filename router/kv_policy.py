"""KV-aware routing: pick the prefill worker with the least work left after its cache hits.

Cost of a worker, in prefill tokens (lower wins; see README "Routing"):

    cost = w_prefill * uncached_tokens(request, worker)        what this request adds
         + w_queue   * (queued_tokens + inflight_tokens)       prefill work ahead of it
         + w_decode  * active                                  decode load sharing the device

``inflight_tokens`` is counted at dispatch time (``update(RouteResult)``), not when requests
finish. Ties are broken at random; ``temperature > 0`` samples from a softmax of the costs
instead of taking the minimum (seeded). Decode affinity: when the request continues a
conversation or an agent's previous step (``previous_decode``) and that decode worker still
holds all but at most ``local_threshold_tokens`` of the prompt, the plan is a local prefill
there (``mode="local"``): no transfer. Without a session, a decode candidate (``RouteRequest.
decode_candidates``) that holds more of the prompt than any prefill worker (a previous step's
output blocks) gets the same plan (``_local``). Pure and synchronous, like every policy.

The fast path (``route``) reads loads from a ``LoadBoard`` kept sorted by load, so a decision
costs one prefix-index walk plus O(workers holding the prefix + fallbacks), not O(workers).
``decide(request, views)`` refreshes the board from the views first (O(workers)).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvrelay.router.config import RouterConfig
from kvrelay.router.fast_decide import rank_masks
from kvrelay.router.index import PrefixIndex
from kvrelay.router.policy import NoWorkers, Plan, Policy, RouteRequest, RouteResult, WorkerView


@dataclass
class _Load:
    queued_tokens: int = 0  # reported by the worker
    active: int = 0  # reported by the worker
    inflight_tokens: int = 0  # dispatched by this router, not yet seen finished
    load: float = 0.0


class LoadBoard:
    """Per-worker load, kept sorted by its cost term. Bounded: ``max_tracked`` requests in flight
    are remembered for ``finish``; past it the oldest is forgotten and its tokens released."""

    def __init__(self, w_queue: float, w_decode: float, max_tracked: int = 65536) -> None:
        self.w_queue, self.w_decode = w_queue, w_decode
        self.max_tracked = max_tracked
        self._loads: dict[str, _Load] = {}
        self._order: list[tuple[float, str]] = []  # (load, worker), ascending
        self._tracked: OrderedDict[str, tuple[str, int]] = OrderedDict()  # request -> (worker, tokens)
        self.forgotten = 0
        self.members = 0  # bumped when a worker is added or removed

    def __len__(self) -> int:
        return len(self._loads)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._loads

    def load(self, worker_id: str) -> float:
        return self._loads[worker_id].load

    def order(self) -> list[tuple[float, str]]:
        return self._order

    def set(self, worker_id: str, queued_tokens: int = 0, active: int = 0,
            inflight_tokens: int | None = None) -> None:
        """Add or update a worker's reported load (``inflight_tokens=None`` keeps the count)."""
        cur = self._loads.get(worker_id)
        if cur is None:
            cur = self._loads[worker_id] = _Load()
            self.members += 1
        elif (cur.queued_tokens == queued_tokens and cur.active == active
              and (inflight_tokens is None or cur.inflight_tokens == inflight_tokens)):
            return  # unchanged: keep its place
        else:
            self._unlist(worker_id, cur.load)
        cur.queued_tokens, cur.active = queued_tokens, active
        if inflight_tokens is not None:
            cur.inflight_tokens = inflight_tokens
        self._relist(worker_id, cur)

    def remove(self, worker_id: str) -> None:
        cur = self._loads.pop(worker_id, None)
        if cur is not None:
            self._unlist(worker_id, cur.load)
            self.members += 1

    def dispatched(self, request_id: str, worker_id: str, tokens: int) -> None:
        if worker_id not in self._loads or request_id in self._tracked:
            return
        if len(self._tracked) >= self.max_tracked:
            old_req, (old_w, old_t) = self._tracked.popitem(last=False)
            self.forgotten += 1
            self._add(old_w, -old_t)
        self._tracked[request_id] = (worker_id, tokens)
        self._add(worker_id, tokens)

    def finished(self, request_id: str) -> None:
        entry = self._tracked.pop(request_id, None)
        if entry is not None:
            self._add(entry[0], -entry[1])

    def _add(self, worker_id: str, tokens: int) -> None:
        cur = self._loads.get(worker_id)
        if cur is not None:
            self._unlist(worker_id, cur.load)
            cur.inflight_tokens = max(0, cur.inflight_tokens + tokens)
            self._relist(worker_id, cur)

    def _unlist(self, worker_id: str, load: float) -> None:
        i = bisect_left(self._order, (load, worker_id))
        del self._order[i]

    def _relist(self, worker_id: str, cur: _Load) -> None:
        cur.load = self.w_queue * (cur.queued_tokens + cur.inflight_tokens) + self.w_decode * cur.active
        insort(self._order, (cur.load, worker_id))


def _depth(bit: int, records: list[tuple[int, int]]) -> int:
    """Leading blocks of the worker with slot ``bit`` in ``match_masks`` records (0: none)."""
    if bit:
        for mask, depth in records:
            if bit & mask:
                return depth
    return 0


@dataclass
class KvAware(Policy):
    """Least cost after cache hits (see module doc). ``index`` supplies the overlaps."""

    needs_hashes = True  # the dispatcher computes the prompt's block hashes for this policy

    index: PrefixIndex | None = None
    block_size: int = 32
    w_prefill: float = 1.0
    w_queue: float = 1.0
    w_decode: float = 32.0
    temperature: float = 0.0
    local_threshold_tokens: int = 256
    max_fallbacks: int = 3
    seed: int | None = None
    name: str = "kv_aware"
    board: LoadBoard = field(init=False, repr=False)
    _rng: random.Random = field(init=False, repr=False)
    _bits: dict[str, int] = field(init=False, repr=False, default_factory=dict)
    _bits_key: tuple[int, int] = field(init=False, repr=False, default=(-1, -1))
    _board_mask: int = field(init=False, repr=False, default=0)

    @classmethod
    def from_config(cls, cfg: RouterConfig, index: PrefixIndex | None, block_size: int,
                    seed: int | None = None) -> KvAware:
        return cls(index=index, block_size=block_size, w_prefill=cfg.kv_w_prefill, w_queue=cfg.kv_w_queue,
                   w_decode=cfg.kv_w_decode, temperature=cfg.kv_temperature,
                   local_threshold_tokens=cfg.kv_local_threshold_tokens,
                   max_fallbacks=cfg.kv_max_fallbacks, seed=seed)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.temperature < 0 or self.max_fallbacks < 0:
            raise ValueError("block_size >= 1, temperature >= 0 and max_fallbacks >= 0 are required")
        self.board = LoadBoard(self.w_queue, self.w_decode)
        self._rng = random.Random(self.seed)

    # --- the Policy interface -------------------------------------------------------------------
    def decide(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Plan:
        """Refresh the board from ``workers`` (their load is authoritative), then ``route``."""
        self._refresh(workers)
        overlap = None
        if self.index is None or not request.block_hashes:
            overlap = {v.worker_id: v.cached_blocks for v in workers if v.cached_blocks}
        return self.route(request, overlap)

    def _refresh(self, workers: Sequence[WorkerView]) -> None:
        board, seen = self.board, set()
        for v in workers:
            seen.add(v.worker_id)
            board.set(v.worker_id, v.queued_tokens, v.active, v.inflight_tokens)
        for wid in [wid for _, wid in board.order() if wid not in seen]:
            board.remove(wid)

    def update(self, result: RouteResult) -> None:
        if result.outcome == "dispatched":
            self.board.dispatched(result.request_id, result.worker_id,
                                  max(0, result.num_tokens - result.cached_tokens))
        else:
            self.board.finished(result.request_id)

    # --- the fast path ----------------------------------------------------------------------------
    def route(self, request: RouteRequest, overlap: dict[str, int] | None = None) -> Plan:
        """Decide from the board and the index (or the given ``{worker: cached blocks}``)."""
        if not self.board:
            raise NoWorkers("no live prefill worker")
        local = bool(request.previous_decode or request.decode_candidates)
        if overlap is None and self.index is not None and request.block_hashes and not self.temperature:
            records = self.index.match_masks(request.block_hashes)
            ranked, cached = self._rank_masks(request.num_tokens, records)
            if local:
                index, board = self.index, self._board_mask
                deepest = next((d for m, d in records if m & board), 0)

                def held_of(w: str) -> int:
                    return _depth(index.bit(w), records)
        else:
            if overlap is None:
                overlap = self._overlap(request)
            ranked = self._rank(request.num_tokens, overlap)
            cached = overlap.get(ranked[0][1], 0)
            if local:
                deepest = max((c for w, c in overlap.items() if w in self.board), default=0)
                held_of = overlap.get  # type: ignore[assignment]
        best_cost, best = ranked[0]
        fallbacks = tuple(w for _, w in ranked[1:])
        if local:
            plan = self._local(request, lambda w: held_of(w) or 0, deepest, (best, *fallbacks))
            if plan is not None:
                return plan
        return Plan(worker_id=best, fallbacks=fallbacks, cached_blocks=cached, cost=best_cost,
                    reason=self.name)

    def _local(self, request: RouteRequest, held_of: Callable[[str], int], deepest: int,
               prefill: tuple[str, ...]) -> Plan | None:
        """A local-prefill plan, or None. ``deepest``: most leading blocks any prefill worker holds.

        1. ``previous_decode`` (the session's last decode worker) holding all but at most
           ``local_threshold_tokens`` of the prompt (the larger of the index's count and the
           session's ``previous_blocks``): reason ``decode_affinity``.
        2. Else the ``decode_candidates`` worker holding the most, if that is more than every
           prefill worker holds (blocks only it has: a previous step's output) and leaves at
           most ``local_threshold_tokens`` uncached: reason ``decode_cache``.
        The fallbacks are the prefill plan's workers, best first.
        """
        need = request.num_tokens - self.local_threshold_tokens  # tokens the worker must hold
        prev = request.previous_decode
        if prev:
            held = max(request.previous_blocks, held_of(prev))
            if held and held * self.block_size >= need:
                return Plan(worker_id=prev, fallbacks=prefill, cached_blocks=held, reason="decode_affinity",
                            mode="local")
        top, depth = "", deepest
        for w in request.decode_candidates:
            c = held_of(w) if w != prev else 0
            if c > depth:
                top, depth = w, c
        if top and depth * self.block_size >= need:
            return Plan(worker_id=top, fallbacks=prefill, cached_blocks=depth, reason="decode_cache",
                        mode="local")
        return None

    def _rank_masks(self, num_tokens: int, records: list[tuple[int, int]]) -> tuple[list, int]:
        """``_rank`` on ``PrefixIndex.match_masks`` records; also returns the winner's blocks."""
        return rank_masks(self, num_tokens, records)

    def _overlap(self, request: RouteRequest) -> dict[str, int]:
        if self.index is None or not request.block_hashes:
            return {}
        return self.index.match(request.block_hashes)

    def _rank(self, num_tokens: int, overlap: dict[str, int]) -> list[tuple[float, str]]:
        """[(cost, worker)] best first: the winner, then up to ``max_fallbacks`` others.

        Scans workers by ascending load and stops once no unseen worker can enter the top
        (its load plus the cheapest prefill term still left beats the current k-th cost).
        """
        if self.temperature > 0:
            return self._sample(num_tokens, overlap)
        loads = self.board._loads
        held = [c for w, c in overlap.items() if c and w in loads]
        if not held:
            return self._least_loaded(self.w_prefill * num_tokens)
        wp, bs, k = self.w_prefill, self.block_size, 1 + self.max_fallbacks
        base = wp * num_tokens
        floor = max(0.0, base - wp * bs * max(held))  # cheapest prefill term any worker can get
        unseen = len(held)
        top: list[tuple[float, str]] = []
        ties: list[str] = []
        for load, w in self.board.order():
            if len(top) >= k and load + floor > top[-1][0]:
                break
            c = overlap.get(w, 0)
            if c:
                unseen -= 1
                if not unseen:
                    floor = base
            cost = max(0.0, base - wp * bs * c) + load
            if not top or cost < top[0][0]:
                ties = [w]
            elif cost == top[0][0]:
                ties.append(w)
            if len(top) < k or cost < top[-1][0]:
                insort(top, (cost, w))
                del top[k:]
        return self._pick(top, ties)

    def _least_loaded(self, base: float) -> list[tuple[float, str]]:
        order, k = self.board.order(), 1 + self.max_fallbacks
        low = order[0][0]
        run = bisect_right(order, (low, "\U0010ffff"))
        top = [(base + load, w) for load, w in order[: max(k, 1)]]
        ties = [w for _, w in order[:run]] if run > 1 else [order[0][1]]
        return self._pick(top, ties)

    def _pick(self, top: list[tuple[float, str]], ties: list[str]) -> list[tuple[float, str]]:
        if len(ties) < 2:
            return top
        pick = ties[self._rng.randrange(len(ties))]
        best = top[0][0]
        return [(best, pick)] + [t for t in top if t[1] != pick][: self.max_fallbacks]

    def _sample(self, num_tokens: int, overlap: dict[str, int]) -> list[tuple[float, str]]:
        """Softmax over every worker's cost: p ~ exp(-(c - c_min) / (T * max(1, c_max - c_min)))."""
        wp, bs, base = self.w_prefill, self.block_size, self.w_prefill * num_tokens
        costs = [(max(0.0, base - wp * bs * overlap.get(w, 0)) + load, w) for load, w in self.board.order()]
        lo = costs[0][0] if len(costs) == 1 else min(c for c, _ in costs)
        scale = self.temperature * max(1.0, max(c for c, _ in costs) - lo)
        weights = [math.exp(-(c - lo) / scale) for c, _ in costs]
        pick = self._rng.choices(range(len(costs)), weights=weights)[0]
        rest = sorted(costs[:pick] + costs[pick + 1:])
        return [costs[pick]] + rest[: self.max_fallbacks]


@dataclass
class Oracle(KvAware):
    """KvAware with perfect cache knowledge, for the simulator: ``cached(worker, request)``
    returns how many leading blocks of the request the worker really holds. O(workers)."""

    cached: Callable[[str, RouteRequest], int] | None = None
    name: str = "oracle"

    def decide(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Plan:
        """Refresh the board from ``workers``, then route by ``cached`` (the views' cached_blocks
        are not used: the oracle knows better)."""
        self._refresh(workers)
        return self.route(request, self._overlap(request))

    def _overlap(self, request: RouteRequest) -> dict[str, int]:
        if self.cached is None:
            raise ValueError("Oracle needs a cached(worker, request) function")
        out = {}
        for w in (request.previous_decode, *request.decode_candidates):
            if w:
                out[w] = self.cached(w, request)
        for _, w in self.board.order():
            n = self.cached(w, request)
            if n:
                out[w] = n
        return out
