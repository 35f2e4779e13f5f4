"""The router's side of local prefill (decode affinity): sessions, decode candidates, metrics.

For a ``kv_aware`` router (the only policy that plans local prefills; it needs block hashes)
with ``router.kv_local_prefill`` on, each request's ``RouteRequest`` carries:

- ``previous_decode`` / ``previous_blocks``: when the request names a session whose last step
  finished on a decode worker that is live and not full, that worker and how many leading
  blocks of this prompt the session record vouches for (``router/sessions.py``);
- ``decode_candidates``: the live decode workers that are not draining and whose last heartbeat
  shows a free slot (the worker itself has the last word: it refuses when full or past its
  local-prefill budget), and ``decode_loads``: what those heartbeats report (running requests,
  local-prefill tokens in flight, the budget), for the P/D decider (``router/pd_decider.py``).
  A request without a session may go local too (``decode_cache``, or ``prefill_load`` when the
  adaptive decider finds the prefill path the slower one).

``decided(plan)`` logs the P/D decider's decision with its inputs (``pd_decision``: info for a
local choice, debug for a remote one) and counts it in
``kvrelay_router_pd_decisions_total{choice, reason}``.

A ``mode="local"`` plan is sent as the request's ``PrefillTask`` to
``kvrelay.<ns>.local.<decode worker>`` (core request/reply, answered at once with a
``DispatchReply``). Accepted: the decode worker prefills the whole prompt (its prefix cache
makes the held part free) and streams every token, seq 0 included. Refused (``overloaded``,
``draining``, ``invalid``, ``unsupported``), unreachable, unanswered or a bad reply: the router
asks the policy again without the local options and takes the normal prefill path. Each
attempt is counted in ``kvrelay_router_local_prefill_total{reason, outcome}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvrelay.base.logs import get_logger
from kvrelay.router.config import RouterConfig
from kvrelay.router.policy import DecodeLoad, Plan, RouteRequest
from kvrelay.router.sessions import Session, SessionMap, held_blocks, marks
from kvrelay.schemas.messages import WorkerInfo

log = get_logger(__name__)

DECODE_ROLES = ("decode", "both")


class LocalMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.dispatches = Counter(
            "kvrelay_router_local_prefill_total",
            "Local-prefill dispatches to decode workers, by plan reason (decode_affinity, decode_cache, "
            "prefill_load) and outcome (accepted, overloaded, draining, invalid, unsupported, timeout, "
            "unreachable, bad_reply)", ["reason", "outcome"], registry=r)
        self.decisions = Counter(
            "kvrelay_router_pd_decisions_total",
            "P/D decisions for requests with a decode worker to go to: choice (local, remote) and reason "
            "(within_threshold, tiny_uncached, cheaper_local, over_threshold, no_room, cheaper_remote)",
            ["choice", "reason"], registry=r)
        self.lookups = Counter(
            "kvrelay_router_session_lookups_total",
            "Session lookups at dispatch: hit, miss, worker_gone (not live), worker_busy (draining or full)",
            ["result"], registry=r)
        self.sessions = Gauge("kvrelay_router_sessions", "Sessions remembered (session -> decode worker)",
                              registry=r)
        self.evictions = Counter("kvrelay_router_session_evictions_total",
                                 "Sessions forgotten because the session map was full (LRU)", registry=r)


class LocalRouting:
    """Sessions and the local-prefill parts of a ``RouteRequest``. Pure apart from metrics."""

    def __init__(self, cfg: RouterConfig, registry: CollectorRegistry) -> None:
        self.enabled = cfg.kv_local_prefill
        self.sessions = SessionMap(cfg.max_sessions)
        self.metrics = LocalMetrics(registry)

    def route_request(self, request_id: str, tenant: str, num_tokens: int, hashes: Sequence[int] | None,
                      session_id: str, decode_workers: Sequence[WorkerInfo]) -> RouteRequest:
        """The policy's request; local options only when enabled and the policy hashes prompts."""
        if not self.enabled or hashes is None:
            return RouteRequest(request_id, tenant, num_tokens, block_hashes=hashes)
        live = {i.worker_id: i for i in decode_workers}
        cands = tuple(w for w, i in live.items() if not i.draining and i.active < i.max_slots)
        loads = tuple(DecodeLoad(w, live[w].active, live[w].max_slots, live[w].queued_tokens,
                                 live[w].local_budget_tokens) for w in cands)
        prev, blocks = "", 0
        if session_id:
            rec = self.sessions.get(tenant, session_id)
            if rec is None:
                result = "miss"
            elif rec.worker not in live:
                result = "worker_gone"
            elif rec.worker not in cands:
                result = "worker_busy"
            else:
                result, prev, blocks = "hit", rec.worker, held_blocks(rec, hashes)
            self.metrics.lookups.labels(result).inc()
        return RouteRequest(request_id, tenant, num_tokens, block_hashes=hashes, previous_decode=prev,
                            previous_blocks=blocks, decode_candidates=cands, decode_loads=loads)

    def decided(self, plan: Plan, request_id: str) -> Plan:
        """Log and count the plan's P/D decision (when it has one); returns ``plan``."""
        pd = plan.pd
        if pd is not None:
            self.metrics.decisions.labels(pd.choice, pd.reason).inc()
            emit = log.info if pd.choice == "local" else log.debug
            emit("pd_decision", request_id=request_id, **vars(pd))
        return plan

    def finished(self, tenant: str, session_id: str, worker: WorkerInfo | None, prompt: Sequence[int],
                 output: Sequence[int], prompt_hashes: Sequence[int] | None,
                 hasher: Callable[[Sequence[int], str], Sequence[int]] | None) -> bool:
        """A session's request finished on ``worker``: remember it if it is a decode worker."""
        if not (self.enabled and session_id and worker is not None and worker.role in DECODE_ROLES):
            return False
        if hasher is None or prompt_hashes is None:
            return False
        # the last output token was sampled, never fed back: its KV does not exist
        held = [*prompt, *output[:-1]]
        full = hasher(held, tenant) if output[:-1] else prompt_hashes
        before = self.sessions.evictions
        rec = Session(worker.worker_id, len(held), marks(prompt_hashes, full))
        self.sessions.put(tenant, session_id, rec)
        self.metrics.evictions.inc(self.sessions.evictions - before)
        self.metrics.sessions.set(len(self.sessions))
        return True
