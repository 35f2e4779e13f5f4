"""The P/D decider (router/pd_decider.py): remote or local prefill per request. Pure, no I/O."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry

from kvrelay.router.config import RouterConfig
from kvrelay.router.index import PrefixIndex
from kvrelay.router.kv_policy import KvAware
from kvrelay.router.local_prefill import LocalRouting
from kvrelay.router.pd_decider import REASONS, Candidate, PdDecider, PdInputs
from kvrelay.router.policy import DecodeLoad, RouteRequest
from kvrelay.schemas.hashing import HashSpec
from kvrelay.schemas.kv_events import KvEvent, KvEventBatch
from kvrelay.schemas.messages import WorkerInfo

BS = 16
PD = PdDecider()  # adaptive, the defaults


def _inp(n: int = 128, pending: int = 0, *cands: Candidate, cached: int = 0, session: str = "") -> PdInputs:
    return PdInputs(num_tokens=n, block_size=BS, prefill_worker="p", prefill_cached=cached, prefill_deepest=cached,
                    prefill_pending=pending, session=session, candidates=cands)


def test_pd_decider_adaptive_keeps_a_fresh_prompt_remote_while_the_prefill_worker_is_idle() -> None:
    d = PD.decide(_inp(128, 0, Candidate("d1", active=7, max_slots=8)))
    assert (d.choice, d.reason, d.worker_id) == ("remote", "cheaper_remote", "")
    # what it weighed: 128 + 128 hop + 0.02 * 128 against 128 + 0.5 * 7 * 128
    assert (d.remote_cost, d.local_cost, d.uncached_local, d.decode_active) == (258.6, 576.0, 128, 7)


def test_pd_decider_adaptive_prefills_locally_when_the_prefill_queue_is_long() -> None:
    d = PD.decide(_inp(128, 2500, Candidate("d1", active=7, max_slots=8)))
    assert (d.choice, d.reason, d.worker_id, d.prefill_pending) == ("local", "cheaper_local", "d1", 2500)
    # the same request once the queue is gone: back to the prefill worker
    assert PD.decide(_inp(128, 0, Candidate("d1", active=7, max_slots=8))).choice == "remote"
    # a lightly loaded decode worker takes it even from an idle prefill worker (its streams lose little)
    assert PD.decide(_inp(128, 0, Candidate("d1", active=1, max_slots=8))).reason == "cheaper_local"


def test_pd_decider_adaptive_always_takes_a_tiny_uncached_part_locally() -> None:
    busy = Candidate("d1", held_blocks=8, active=7, max_slots=8)  # holds 128 of 140 tokens
    d = PD.decide(_inp(140, 0, busy))
    assert (d.choice, d.reason, d.uncached_local) == ("local", "tiny_uncached", 12)
    # the rule, not the costs: with streams that weigh ten times as much, still local; without the rule, not
    heavy = PdDecider(w_interference=10.0)
    assert heavy.decide(_inp(140, 0, busy, cached=8)).reason == "tiny_uncached"
    assert PdDecider(w_interference=10.0, always_local_tokens=0).decide(_inp(140, 0, busy, cached=8)).choice == "remote"


def test_pd_decider_adaptive_needs_the_threshold_a_slot_and_budget_room() -> None:
    over = PD.decide(_inp(300, 5000, Candidate("d1", max_slots=8)))  # 300 uncached > 256
    assert (over.choice, over.reason) == ("remote", "over_threshold")
    full = PD.decide(_inp(128, 5000, Candidate("d1", active=8, max_slots=8)))
    assert (full.choice, full.reason) == ("remote", "no_room")
    spent = PD.decide(_inp(128, 5000, Candidate("d1", max_slots=8, pending=100, budget=200)))
    assert (spent.choice, spent.reason) == ("remote", "no_room")
    fits = PD.decide(_inp(128, 5000, Candidate("d1", max_slots=8, pending=72, budget=200)))
    assert (fits.choice, fits.worker_id) == ("local", "d1")
    # a prompt over the budget of an idle worker: never (the worker would refuse it)
    assert PD.decide(_inp(128, 5000, Candidate("d1", max_slots=8, budget=100))).reason == "no_room"
    assert PD.decide(_inp(128, 5000)).reason == "over_threshold"  # no candidate at all


def test_pd_decider_adaptive_picks_the_cheapest_decode_worker_and_the_session_on_ties() -> None:
    busy, idle = Candidate("d1", active=6, max_slots=8), Candidate("d2", active=0, max_slots=8, pending=64)
    assert PD.decide(_inp(128, 3000, busy, idle)).worker_id == "d2"  # 192 < 128 + 384
    a, b = Candidate("a", max_slots=8), Candidate("b", max_slots=8)
    assert PD.decide(_inp(128, 3000, a, b, session="b")).worker_id == "b"
    # equal cost and no session: the one holding more of the prompt (both compute the same suffix here)
    c = Candidate("c", held_blocks=2, max_slots=8, pending=32)
    assert PD.decide(_inp(128, 3000, a, c)).worker_id == "c"


def test_pd_decider_threshold_is_the_load_blind_first_rule() -> None:
    th = PdDecider(mode="threshold", threshold_tokens=32)
    home = Candidate("d1", held_blocks=8, active=8, max_slots=8)  # 128 of 160 held, and full
    d = th.decide(_inp(160, 0, home, session="d1"))
    assert (d.choice, d.reason, d.worker_id, d.decider) == ("local", "within_threshold", "d1", "threshold")
    assert th.decide(_inp(161, 0, home, session="d1")).reason == "over_threshold"
    # without a session: only a worker holding more than every prefill worker, whatever the queue
    assert th.decide(_inp(160, 10_000, Candidate("d2", held_blocks=8), cached=8)).choice == "remote"
    assert th.decide(_inp(160, 0, Candidate("d2", held_blocks=9), cached=8)).worker_id == "d2"


def test_pd_decider_decisions_are_consistent_on_random_inputs() -> None:
    rng = random.Random(5)
    for mode in ("adaptive", "threshold"):
        pd = PdDecider(mode=mode, threshold_tokens=rng.choice([0, 64, 256]))
        for _ in range(2000):
            cands = tuple(Candidate(f"d{i}", rng.randint(0, 12), rng.randint(0, 8), rng.randint(1, 8),
                                    rng.randint(0, 300), rng.choice([0, 128, 512])) for i in range(rng.randint(0, 3)))
            inp = _inp(rng.randint(1, 400), rng.randint(0, 4000), *cands, cached=rng.randint(0, 10),
                       session=rng.choice(["", "d0", "d1"]))
            d = pd.decide(inp)
            assert d.reason in REASONS and d.choice in ("local", "remote")
            if d.choice == "remote":
                assert d.worker_id == ""
                continue
            c = next(c for c in cands if c.worker_id == d.worker_id)
            uncached = max(0, inp.num_tokens - BS * c.held_blocks)
            assert uncached <= pd.threshold_tokens and d.held_blocks == c.held_blocks
            if mode == "adaptive":  # never onto a full worker or past its budget
                assert c.active < c.max_slots and (not c.budget or c.pending + uncached <= c.budget)
                assert d.reason == "tiny_uncached" or d.local_cost < d.remote_cost


def test_pd_decider_from_config_reads_the_router_section() -> None:
    cfg = RouterConfig(pd_decider="threshold", kv_local_threshold_tokens=64, pd_always_local_tokens=4,
                       pd_remote_overhead_tokens=10.0, pd_transfer_token_cost=0.5, pd_local_token_cost=2.0,
                       pd_w_interference=0.25)
    assert PdDecider.from_config(cfg) == PdDecider("threshold", 64, 4, 10.0, 0.5, 2.0, 0.25)
    assert PdDecider.from_config(RouterConfig()).mode == "adaptive"  # the default
    assert KvAware.from_config(cfg, None, BS).pd == PdDecider.from_config(cfg)


# --- in the kv_aware policy: dispatch-time load from the ledger -------------------------------------
SPEC = HashSpec(BS).fingerprint


def _policy() -> KvAware:
    idx = PrefixIndex(SPEC)
    idx.apply(KvEventBatch(worker_id="p", epoch=1, event_id=1, spec=SPEC, events=[KvEvent.stored([7])]))
    pol = KvAware(index=idx, block_size=BS, seed=1)
    pol.ledger.report("p")
    return pol


def _route(pol: KvAware, rid: str, n: int = 128, active: int = 7) -> RouteRequest:
    return RouteRequest(rid, "t", n, block_hashes=list(range(100, 100 + n // BS)), decode_candidates=("d1",),
                        decode_loads=(DecodeLoad("d1", active=active, max_slots=8),))


def test_kv_policy_adaptive_goes_local_while_the_prefill_worker_holds_a_long_prompt() -> None:
    pol = _policy()
    plan = pol.route(_route(pol, "short-1"))
    assert (plan.mode, plan.worker_id, plan.pd.reason) == ("prefill", "p", "cheaper_remote")
    pol.ledger.admit("long")
    pol.ledger.assign("long", "p", 2500)  # dispatched, not prefilled yet
    plan = pol.route(_route(pol, "short-2"))
    assert (plan.mode, plan.worker_id, plan.reason, plan.fallbacks) == ("local", "d1", "prefill_load", ("p",))
    assert (plan.pd.choice, plan.pd.prefill_pending) == ("local", 2500)
    pol.ledger.prefill_done("long")  # its first token came: the prefill worker is free again
    assert pol.route(_route(pol, "short-3")).mode == "prefill"


def test_kv_policy_adaptive_counts_this_routers_local_prefills_on_the_decode_worker() -> None:
    pol = _policy()
    pol.ledger.admit("long")
    pol.ledger.assign("long", "p", 2500)
    req = _route(pol, "s", active=0)
    loads = (DecodeLoad("d1", active=0, max_slots=8, local_budget_tokens=200),)
    req = RouteRequest(req.request_id, "t", 128, block_hashes=req.block_hashes, decode_candidates=("d1",),
                       decode_loads=loads)
    assert pol.route(req).mode == "local"
    pol.ledger.admit("s")
    pol.ledger.assign("s", "d1", 128)  # sent there, before the worker's heartbeat says so
    again = pol.route(RouteRequest("s2", "t", 128, block_hashes=req.block_hashes, decode_candidates=("d1",),
                                   decode_loads=loads))
    assert (again.mode, again.pd.reason, again.pd.decode_pending) == ("prefill", "no_room", 128)


def test_local_routing_passes_decode_loads_and_counts_decisions() -> None:
    reg = CollectorRegistry()
    lr = LocalRouting(RouterConfig(), reg)
    infos = [WorkerInfo(worker_id="d1", role="decode", model="m", host="h", block_size=BS, max_slots=4, active=1,
                        queued_tokens=40, local_budget_tokens=300),
             WorkerInfo(worker_id="d2", role="decode", model="m", host="h", block_size=BS, max_slots=1, active=1)]
    req = lr.route_request("r", "t", 128, [1, 2], "", infos)
    assert req.decode_candidates == ("d1",)
    assert req.decode_loads == (DecodeLoad("d1", active=1, max_slots=4, local_tokens=40, local_budget_tokens=300),)
    plan = _policy().route(_route(_policy(), "r"))
    assert lr.decided(plan, "r") is plan
    assert reg.get_sample_value("kvrelay_router_pd_decisions_total",
                                {"choice": "remote", "reason": "cheaper_remote"}) == 1.0
