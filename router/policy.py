"""Routing policies: pure, synchronous state machines. ``decide() -> Plan``, ``update(result)``.

No I/O here. The dispatcher builds a ``RouteRequest`` and the ``WorkerView``s (reported load
merged with what the routers dispatched and have not seen finish: ``router/ledger.py``), asks
the policy for a ``Plan``, dispatches, and tells the policy what happened through ``update``.
Load is counted at dispatch time, not when requests finish.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from kvrelay.router.ledger import LoadLedger


class NoWorkers(Exception):
    """No live worker can take this request."""


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    tenant: str
    num_tokens: int
    # chained block hashes of the prompt's full blocks (None when the policy needs none)
    block_hashes: Sequence[int] | None = None
    # the decode worker that produced this conversation's previous step, when known
    previous_decode: str = ""
    # leading blocks of this prompt that worker is known to hold from the session record
    # (the prefix index may know more); 0 = none known
    previous_blocks: int = 0
    # decode workers that may take a local prefill now (live, not draining, not full)
    decode_candidates: tuple[str, ...] = ()
    # their reported load, for the P/D decider (router/pd_decider.py); a candidate without one counts as idle
    decode_loads: tuple[DecodeLoad, ...] = ()


@dataclass(frozen=True)
class DecodeLoad:
    """A decode worker's load as its heartbeat reports it (``WorkerInfo``)."""

    worker_id: str
    active: int = 0  # requests running there
    max_slots: int = 1
    local_tokens: int = 0  # local-prefill prompt tokens it has taken and not computed yet
    local_budget_tokens: int = 0  # the most it takes in flight (its ITL budget); 0 = no budget


@dataclass(frozen=True)
class PdDecision:
    """What the P/D decider chose and from what (router/pd_decider.py): logged and counted.

    ``choice`` "local" or "remote"; ``reason`` one of ``pd_decider.REASONS``. Costs are in prefill-token
    time (``local_cost`` -1: no decode worker could take it)."""

    choice: Literal["local", "remote"]
    reason: str
    decider: str
    worker_id: str = ""  # the decode worker of a local choice
    held_blocks: int = 0  # leading blocks of the prompt the decode worker weighed holds
    num_tokens: int = 0
    uncached_remote: int = 0  # on the best prefill worker
    uncached_local: int = 0  # on the cheapest decode worker that could take it
    prefill_pending: int = 0  # prompt tokens ahead on the best prefill worker
    decode_pending: int = 0  # local-prefill tokens in flight on that decode worker
    decode_active: int = 0
    remote_cost: float = 0.0
    local_cost: float = -1.0
    candidates: int = 0


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    role: str = "prefill"
    # reported by the worker (heartbeat)
    queued_tokens: int = 0
    active: int = 0
    max_slots: int = 1
    # counted by routers at dispatch time, not yet seen finished
    inflight: int = 0
    inflight_tokens: int = 0
    # leading blocks of this request the worker holds (filled in by the prefix index)
    cached_blocks: int = 0


@dataclass(frozen=True)
class Plan:
    worker_id: str
    # other workers to try, in order, if the first rejects the task
    fallbacks: tuple[str, ...] = ()
    cached_blocks: int = 0
    cost: float = 0.0
    reason: str = ""
    # "prefill": send to a prefill worker; "local": the decode worker prefills locally
    mode: Literal["prefill", "local"] = "prefill"
    # the P/D decider's decision, when the request had local options (None: it had none)
    pd: PdDecision | None = None


@dataclass(frozen=True)
class RouteResult:
    request_id: str
    worker_id: str
    outcome: Literal["dispatched", "rejected", "finished", "failed"]
    num_tokens: int = 0
    cached_tokens: int = 0


class Policy(ABC):
    name: str = ""

    @abstractmethod
    def decide(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Plan:
        """Pick a worker; raise NoWorkers when ``workers`` is empty."""

    def update(self, result: RouteResult) -> None:  # noqa: B027 - optional hook
        """Learn from what happened to a plan. Stateless policies ignore it."""

    def bind(self, ledger: LoadLedger) -> None:  # noqa: B027 - optional hook
        """Read dispatch-time load from ``ledger`` (``router/ledger.py``), its one owner. Policies
        that need more than the views they are handed keep a reference; the others ignore it."""


def order_by_cost(
    workers: Sequence[WorkerView], costs: Sequence[float], rng: random.Random
) -> list[WorkerView]:
    """Workers from cheapest to dearest, ties in random order."""
    keyed = [(c, rng.random(), i) for i, c in enumerate(costs)]
    keyed.sort()
    return [workers[i] for _, _, i in keyed]


@dataclass
class LeastLoaded(Policy):
    """Fewest queued prompt tokens (reported plus dispatched-in-flight), then fewest active."""

    seed: int | None = None
    name: str = "least_loaded"
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def decide(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Plan:
        if not workers:
            raise NoWorkers("no live prefill worker")
        costs = [
            float(w.queued_tokens + w.inflight_tokens) + 1e-3 * (w.active + w.inflight) for w in workers
        ]
        ranked = order_by_cost(workers, costs, self._rng)
        best = ranked[0]
        return Plan(
            worker_id=best.worker_id,
            fallbacks=tuple(w.worker_id for w in ranked[1:]),
            cost=costs[workers.index(best)],
            reason="least_loaded",
        )


@dataclass
class RoundRobin(Policy):
    name: str = "round_robin"
    _next: int = field(default=0, init=False)

    def decide(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Plan:
        if not workers:
            raise NoWorkers("no live prefill worker")
        ordered = sorted(workers, key=lambda w: w.worker_id)
        i = self._next % len(ordered)
        self._next += 1
        ranked = ordered[i:] + ordered[:i]
        return Plan(
            worker_id=ranked[0].worker_id,
            fallbacks=tuple(w.worker_id for w in ranked[1:]),
            reason="round_robin",
        )
