"""The P/D decider: per request, prefill on a prefill worker ("remote") or on a decode worker ("local").

Pure and synchronous: ``PdDecider.decide(PdInputs) -> PdDecision`` (``router/policy.py``), no I/O, no
clock. ``KvAware`` (``router/kv_policy.py``) builds the inputs from the prefix index, the load ledger
and the decode workers' heartbeats whenever a request has somewhere local to go (its session's decode
worker, or decode candidates: live, not draining, a free slot) and turns a local decision into a
``mode="local"`` plan; ``router/local_prefill.py`` logs and counts every decision
(``kvrelay_router_pd_decisions_total{choice,reason}``). ``router.pd_decider`` picks the rule:

``threshold`` (kvrelay's first rule, blind to load): local when the session's decode worker holds all
but at most ``threshold_tokens`` of the prompt (the larger of the index's and the session record's
count), or else when a candidate holding more of it than every prefill worker leaves at most that much
uncached.

``adaptive`` (the default): conditional disaggregation (Dynamo), costed in prefill-token time (what a
prefill worker takes for one prompt token)::

    remote   = pending(p) + uncached(p) + overhead + transfer * prompt
    local(d) = local_cost * (pending(d) + uncached(d)) + w_interference * active(d) * uncached(d)

``p`` is the kv-aware ranking's best prefill worker; ``d`` ranges over the decode workers that could
take the request: uncached(d) <= ``threshold_tokens`` (a hard cap on what a decode worker computes)
and room (a free slot, and pending(d) + uncached(d) within the local-prefill budget it advertises,
``workers/local_budget.py``). The cheapest ``d`` (ties: the session's worker, then the one holding
more) goes local when uncached(d) <= ``always_local_tokens`` (llm-d's decider: a prefill stage for a
handful of tokens is pure overhead) or local(d) < remote; otherwise the request goes remote.
"pending" is dispatch-time load: the larger of what the worker reports and what the routers sent it
and have not seen prefilled (``LoadLedger.pending_tokens``); "active" likewise (running requests).
A decode worker's free KV blocks are not weighed: the request needs the same KV there either way.

So an idle prefill worker keeps fresh prompts remote while decode streams run (local would cost them
``w_interference * active * uncached``: the interference disaggregation removes); a prefill worker
busy with long prompts (pending in the thousands) lets a short prompt prefill on a decode worker
instead of queueing behind them (where 1:1 disaggregation loses to plain vLLM); a session's step with
a small new suffix goes home, since the remote path has to compute the previous step's output as well.
The decode worker has the last word: past its budget it refuses, and the request takes the prefill path.

Why ``adaptive`` is the default: where ``threshold`` goes local (a session's suffix of up to a few
hundred tokens on a lightly loaded decode worker) it goes local too; beyond that it goes local only
when the prefill path's estimated wait is the longer one, so a short prompt no longer waits behind a
long one. What it can cost is decode ITL: one local prefill's stall per admitted request, which the
decode worker's ITL budget (``decode.local_itl_target_ms``) caps. ``threshold`` stays for
deployments tuned for it.

Reasons (bounded: the metric's label, ``REASONS``): local ``within_threshold`` (threshold),
``tiny_uncached``, ``cheaper_local``; remote ``over_threshold`` (no decode worker within the
threshold), ``no_room`` (within it, but no slot or budget), ``cheaper_remote``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvrelay.router.config import RouterConfig
from kvrelay.router.policy import PdDecision

REASONS = ("within_threshold", "tiny_uncached", "cheaper_local",  # local
           "over_threshold", "no_room", "cheaper_remote")  # remote


@dataclass(frozen=True)
class Candidate:
    """A decode worker that may prefill the request locally, with its dispatch-time load."""

    worker_id: str
    held_blocks: int = 0  # leading blocks of the prompt it holds
    active: int = 0
    max_slots: int = 1
    pending: int = 0  # local-prefill tokens it has taken and not computed yet
    budget: int = 0  # the most it takes in flight (0: no budget)


@dataclass(frozen=True)
class PdInputs:
    num_tokens: int
    block_size: int
    prefill_worker: str  # the best prefill worker of the ranking
    prefill_cached: int = 0  # leading blocks it holds
    prefill_deepest: int = 0  # the most leading blocks any prefill worker holds
    prefill_pending: int = 0  # prompt tokens ahead of this one there
    session: str = ""  # the session's decode worker ("" = none); also among the candidates
    candidates: tuple[Candidate, ...] = ()


@dataclass(frozen=True)
class PdDecider:
    """See the module doc; ``from_config`` reads ``router.pd_*`` and ``kv_local_threshold_tokens``."""

    mode: Literal["adaptive", "threshold"] = "adaptive"
    threshold_tokens: int = 256
    always_local_tokens: int = 16
    remote_overhead_tokens: float = 128.0
    transfer_token_cost: float = 0.02
    local_token_cost: float = 1.0
    w_interference: float = 0.5

    @classmethod
    def from_config(cls, cfg: RouterConfig) -> PdDecider:
        return cls(mode=cfg.pd_decider, threshold_tokens=cfg.kv_local_threshold_tokens,
                   always_local_tokens=cfg.pd_always_local_tokens,
                   remote_overhead_tokens=cfg.pd_remote_overhead_tokens,
                   transfer_token_cost=cfg.pd_transfer_token_cost, local_token_cost=cfg.pd_local_token_cost,
                   w_interference=cfg.pd_w_interference)

    def decide(self, inp: PdInputs) -> PdDecision:
        if self.mode == "threshold":
            return self._threshold(inp)
        return self._adaptive(inp)

    def remote_cost(self, inp: PdInputs) -> float:
        """The prefill path's estimated time to this request's KV on a decode worker, in prefill tokens."""
        uncached = max(0, inp.num_tokens - inp.block_size * inp.prefill_cached)
        return (inp.prefill_pending + uncached + self.remote_overhead_tokens
                + self.transfer_token_cost * inp.num_tokens)

    def local_cost(self, c: Candidate, uncached: int) -> float:
        """A local prefill's estimated time on ``c`` plus what it costs the streams running there."""
        return self.local_token_cost * (c.pending + uncached) + self.w_interference * c.active * uncached

    # --- the rules --------------------------------------------------------------------------------
    def _threshold(self, inp: PdInputs) -> PdDecision:
        need = inp.num_tokens - self.threshold_tokens  # tokens the decode worker must hold
        bs = inp.block_size
        for c in inp.candidates:
            if c.worker_id == inp.session and c.held_blocks and c.held_blocks * bs >= need:
                return self._decision(inp, "local", "within_threshold", c)
        top, depth = None, inp.prefill_deepest
        for c in inp.candidates:
            if c.worker_id != inp.session and c.held_blocks > depth:
                top, depth = c, c.held_blocks
        if top is not None and depth * bs >= need:
            return self._decision(inp, "local", "within_threshold", top)
        return self._decision(inp, "remote", "over_threshold", None)

    def _adaptive(self, inp: PdInputs) -> PdDecision:
        best: Candidate | None = None
        best_key: tuple[float, bool, int] | None = None
        full: Candidate | None = None  # the first one within the threshold but without room
        for c in inp.candidates:
            uncached = self._uncached(inp, c)
            if uncached > self.threshold_tokens:
                continue
            if c.active >= c.max_slots or (c.budget and c.pending + uncached > c.budget):
                full = full or c
                continue
            key = (self.local_cost(c, uncached), c.worker_id != inp.session, -c.held_blocks)
            if best_key is None or key < best_key:
                best, best_key = c, key
        if best is None:
            return self._decision(inp, "remote", "no_room" if full else "over_threshold", full)
        if self._uncached(inp, best) <= self.always_local_tokens:
            return self._decision(inp, "local", "tiny_uncached", best)
        if best_key is not None and best_key[0] < self.remote_cost(inp):
            return self._decision(inp, "local", "cheaper_local", best)
        return self._decision(inp, "remote", "cheaper_remote", best)

    @staticmethod
    def _uncached(inp: PdInputs, c: Candidate) -> int:
        return max(0, inp.num_tokens - inp.block_size * c.held_blocks)

    def _decision(self, inp: PdInputs, choice: Literal["local", "remote"], reason: str,
                  c: Candidate | None) -> PdDecision:
        """The decision with its inputs; ``c``: the decode worker weighed (None: none could take it)."""
        uncached = self._uncached(inp, c) if c is not None else 0
        return PdDecision(
            choice=choice, reason=reason, decider=self.mode,
            worker_id=c.worker_id if c is not None and choice == "local" else "",
            held_blocks=c.held_blocks if c is not None else 0, num_tokens=inp.num_tokens,
            uncached_remote=max(0, inp.num_tokens - inp.block_size * inp.prefill_cached),
            uncached_local=uncached, prefill_pending=inp.prefill_pending,
            decode_pending=c.pending if c is not None else 0, decode_active=c.active if c is not None else 0,
            remote_cost=round(self.remote_cost(inp), 1),
            local_cost=round(self.local_cost(c, uncached), 1) if c is not None else -1.0,
            candidates=len(inp.candidates))
