"""KV-aware routing: pick the prefill worker with the least work left after its cache hits.

Cost of a worker, in prefill tokens (lower wins; see README "Routing"):

    cost = w_prefill * uncached_tokens(request, worker)        what this request adds
         + w_queue   * (queued_tokens + inflight_tokens)       prefill work ahead of it
         + w_decode  * active                                  decode load sharing the device

``inflight_tokens`` is counted at dispatch time (``LoadLedger.assign``), not when requests
finish. Ties are broken at random; ``temperature > 0`` samples from a softmax of the costs
instead of taking the minimum (seeded). Local prefill: when the request has somewhere local to go
(its session's decode worker, ``previous_decode``, or ``decode_candidates``), the P/D decider
(``router/pd_decider.py``: ``adaptive`` by default, or the load-blind ``threshold`` rule) chooses
between the prefill plan and a local prefill on a decode worker (``mode="local"``: no transfer);
either plan carries its decision (``Plan.pd``). Pure and synchronous, like every policy.

Loads come from a ``LoadLedger`` (``router/ledger.py``: the dispatcher's, through ``bind``,
or the policy's own): its ``Ranking`` keeps the workers sorted by load, so the fast path
(``route``) costs one prefix-index walk plus O(workers holding the prefix + fallbacks), not
O(workers). ``decide(request, views)`` takes the views into the ledger first (O(workers)).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from kvrelay.router.config import RouterConfig
from kvrelay.router.fast_decide import MaskRanker
from kvrelay.router.index import PrefixIndex
from kvrelay.router.ledger import LoadLedger, Ranking
from kvrelay.router.pd_decider import Candidate, PdDecider, PdInputs
from kvrelay.router.policy import DecodeLoad, NoWorkers, Plan, Policy, RouteRequest, WorkerView
from kvrelay.router.topk import TopK, least_loaded, sample

OWN_LEDGER_CAPACITY = 65536  # requests a policy's own ledger admits (standalone use: tests, simulators)


@dataclass
class KvAware(Policy):
    """Least cost after cache hits (see module doc). ``index`` supplies the overlaps, ``ledger``
    the loads (the dispatcher's, once ``bind`` is called; else the policy's own)."""

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
    # the P/D decider; None: ``pd_decider``'s rule with ``local_threshold_tokens`` and default weights
    pd: PdDecider | None = None
    pd_decider: str = "adaptive"
    name: str = "kv_aware"
    ledger: LoadLedger = field(init=False, repr=False)
    ranking: Ranking = field(init=False, repr=False)
    _rng: random.Random = field(init=False, repr=False)
    _ranker: MaskRanker | None = field(init=False, repr=False, default=None)

    @classmethod
    def from_config(cls, cfg: RouterConfig, index: PrefixIndex | None, block_size: int,
                    seed: int | None = None) -> KvAware:
        return cls(index=index, block_size=block_size, w_prefill=cfg.kv_w_prefill, w_queue=cfg.kv_w_queue,
                   w_decode=cfg.kv_w_decode, temperature=cfg.kv_temperature,
                   local_threshold_tokens=cfg.kv_local_threshold_tokens,
                   max_fallbacks=cfg.kv_max_fallbacks, seed=seed, pd=PdDecider.from_config(cfg))

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.temperature < 0 or self.max_fallbacks < 0:
            raise ValueError("block_size >= 1, temperature >= 0 and max_fallbacks >= 0 are required")
        if self.pd is None:
            if self.pd_decider not in ("adaptive", "threshold"):
                raise ValueError(f"pd_decider: adaptive or threshold, not {self.pd_decider!r}")
            self.pd = PdDecider(mode=self.pd_decider,  # type: ignore[arg-type]
                                threshold_tokens=self.local_threshold_tokens)
        self._rng = random.Random(self.seed)
        self.bind(LoadLedger(OWN_LEDGER_CAPACITY))

    def bind(self, ledger: LoadLedger) -> None:
        """Read loads from ``ledger`` (its ranking by this policy's weights) from now on."""
        self.ledger = ledger
        self.ranking = ledger.ranking(self.w_queue, self.w_decode)
        self._ranker = None
        if self.index is not None:
            self._ranker = MaskRanker(self.index, self.ranking, self.w_prefill, self.block_size,
                                      self.max_fallbacks, self._rng)

    # --- the Policy interface -------------------------------------------------------------------
    def decide(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Plan:
        """Take ``workers`` into the ledger (their load is authoritative), then ``route``."""
        self.ledger.observe(workers)
        overlap = None
        if self.index is None or not request.block_hashes:
            overlap = {v.worker_id: v.cached_blocks for v in workers if v.cached_blocks}
        return self.route(request, overlap)

    # --- the fast path ----------------------------------------------------------------------------
    def route(self, request: RouteRequest, overlap: dict[str, int] | None = None) -> Plan:
        """Decide from the ranking and the index (or the given ``{worker: cached blocks}``)."""
        ranking = self.ranking
        if not ranking:
            raise NoWorkers("no live prefill worker")
        local = bool(request.previous_decode or request.decode_candidates)
        ranker = self._ranker
        if overlap is None and ranker is not None and request.block_hashes and not self.temperature:
            records = ranker.index.match_masks(request.block_hashes)
            ranked, cached = ranker.rank(request.num_tokens, records)
            if local:
                mask = ranker.mask
                deepest = next((d for m, d in records if m & mask), 0)

                def held_of(w: str) -> int:
                    return ranker.depth(w, records)
        else:
            if overlap is None:
                overlap = self._overlap(request)
            ranked = self._rank(request.num_tokens, overlap)
            cached = overlap.get(ranked[0][1], 0)
            if local:
                deepest = max((c for w, c in overlap.items() if w in ranking), default=0)
                held_of = overlap.get  # type: ignore[assignment]
        best_cost, best = ranked[0]
        plan = Plan(worker_id=best, fallbacks=tuple(w for _, w in ranked[1:]), cached_blocks=cached,
                    cost=best_cost, reason=self.name)
        if local:
            return self._local(request, plan, lambda w: held_of(w) or 0, deepest)
        return plan

    def _local(self, request: RouteRequest, prefill: Plan, held_of: Callable[[str], int],
               deepest: int) -> Plan:
        """The P/D decider's plan: a local prefill, or ``prefill`` (the prefill plan); both carry the
        decision. ``deepest``: the most leading blocks any prefill worker holds.

        A local plan's reason says what makes the decode worker fit: ``decode_affinity`` (the
        session's worker), ``decode_cache`` (it holds more of the prompt than every prefill worker) or
        ``prefill_load`` (neither: the prefill path is the slower one). Its fallbacks are the prefill
        plan's workers, best first.
        """
        assert self.pd is not None
        decision = self.pd.decide(self._pd_inputs(request, prefill, held_of, deepest))
        if decision.choice == "remote":
            return replace(prefill, pd=decision)
        w = decision.worker_id
        reason = ("decode_affinity" if w == request.previous_decode else
                  "decode_cache" if decision.held_blocks > deepest else "prefill_load")
        return Plan(worker_id=w, fallbacks=(prefill.worker_id, *prefill.fallbacks),
                    cached_blocks=decision.held_blocks, reason=reason, mode="local", pd=decision)

    def _pd_inputs(self, request: RouteRequest, prefill: Plan, held_of: Callable[[str], int],
                   deepest: int) -> PdInputs:
        """The decider's view: the prefill plan's worker and the decode workers, with dispatch-time load."""
        ledger, prev = self.ledger, request.previous_decode
        loads = {x.worker_id: x for x in request.decode_loads}
        cands = []
        for w in ((prev,) if prev else ()) + tuple(x for x in request.decode_candidates if x != prev):
            held = max(held_of(w), request.previous_blocks) if w == prev else held_of(w)
            load = loads.get(w) or DecodeLoad(w)
            inflight, tokens = ledger.load(w)  # this router's local prefills there
            cands.append(Candidate(w, held, max(load.active, inflight), load.max_slots,
                                   max(load.local_tokens, tokens), load.local_budget_tokens))
        return PdInputs(request.num_tokens, self.block_size, prefill.worker_id, prefill.cached_blocks,
                        deepest, ledger.pending_tokens(prefill.worker_id), prev, tuple(cands))

    def _overlap(self, request: RouteRequest) -> dict[str, int]:
        if self.index is None or not request.block_hashes:
            return {}
        return self.index.match(request.block_hashes)

    def _rank(self, num_tokens: int, overlap: dict[str, int]) -> list[tuple[float, str]]:
        """[(cost, worker)] best first: the winner, then up to ``max_fallbacks`` others.

        Scans workers by ascending load and stops once no unseen worker can enter the top
        (its load plus the cheapest prefill term still left beats the current k-th cost).
        """
        wp, bs, order = self.w_prefill, self.block_size, self.ranking.order
        base = wp * num_tokens
        if self.temperature > 0:
            costs = [(max(0.0, base - wp * bs * overlap.get(w, 0)) + load, w) for load, w in order]
            return sample(costs, self.temperature, self._rng, self.max_fallbacks)
        ranking = self.ranking
        held = [c for w, c in overlap.items() if c and w in ranking]
        if not held:
            return least_loaded(order, base, 1 + self.max_fallbacks, self._rng)
        floor = max(0.0, base - wp * bs * max(held))  # cheapest prefill term any worker can get
        unseen = len(held)
        top = TopK(1 + self.max_fallbacks)
        for load, w in order:
            if load + floor > top.limit:
                break
            c = overlap.get(w, 0)
            if c:
                unseen -= 1
                if not unseen:
                    floor = base
            top.offer(max(0.0, base - wp * bs * c) + load, w)
        return top.pick(self._rng)


@dataclass
class Oracle(KvAware):
    """KvAware with perfect cache knowledge, for the simulator: ``cached(worker, request)``
    returns how many leading blocks of the request the worker really holds. O(workers)."""

    cached: Callable[[str, RouteRequest], int] | None = None
    name: str = "oracle"

    def decide(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Plan:
        """Take ``workers`` into the ledger, then route by ``cached`` (the views' cached_blocks
        are not used: the oracle knows better)."""
        self.ledger.observe(workers)
        return self.route(request, self._overlap(request))

    def _overlap(self, request: RouteRequest) -> dict[str, int]:
        if self.cached is None:
            raise ValueError("Oracle needs a cached(worker, request) function")
        out = {}
        for w in (request.previous_decode, *request.decode_candidates):
            if w:
                out[w] = self.cached(w, request)
        for _, w in self.ranking.order:
            n = self.cached(w, request)
            if n:
                out[w] = n
        return out
