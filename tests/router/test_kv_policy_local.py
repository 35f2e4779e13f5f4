"""KvAware local-prefill plans under the ``threshold`` P/D decider: session affinity, decode candidates,
the threshold. No I/O. (The ``adaptive`` decider: ``test_pd_decider.py``.)"""

from __future__ import annotations

from kvrelay.router.index import PrefixIndex
from kvrelay.router.kv_policy import KvAware, Oracle
from kvrelay.router.policy import RouteRequest, WorkerView
from kvrelay.schemas.hashing import HashSpec
from kvrelay.schemas.kv_events import KvEvent, KvEventBatch

SPEC = HashSpec(16).fingerprint
HASHES = list(range(100, 110))  # a 160-token prompt: 10 blocks of 16


def _index(**held: int) -> PrefixIndex:
    idx = PrefixIndex(SPEC)
    for wid, n in held.items():
        idx.apply(KvEventBatch(worker_id=wid, epoch=1, event_id=1, spec=SPEC, events=[KvEvent.stored(HASHES[:n])]))
    return idx


def _policy(idx: PrefixIndex | None, threshold: int = 32, prefill: str = "ab") -> KvAware:
    pol = KvAware(index=idx, block_size=16, local_threshold_tokens=threshold, seed=1, pd_decider="threshold")
    for w in prefill:
        pol.ledger.report(w)
    return pol


def _req(n: int = 160, prev: str = "", prev_blocks: int = 0, cands: tuple[str, ...] = (),
         hashes: list[int] | None = HASHES) -> RouteRequest:
    return RouteRequest("r", "t", n, block_hashes=hashes, previous_decode=prev, previous_blocks=prev_blocks,
                        decode_candidates=cands)


def test_kv_policy_local_threshold_is_inclusive_and_counts_uncached_tokens() -> None:
    pol = _policy(_index(a=4, d1=8))  # d1 holds 128 of the prompt's tokens
    at = pol.route(_req(n=160, prev="d1"))  # 32 uncached == threshold
    assert (at.mode, at.worker_id, at.reason, at.cached_blocks) == ("local", "d1", "decode_affinity", 8)
    assert at.fallbacks[0] == "a"  # refused: the best prefill worker next
    over = pol.route(_req(n=161, prev="d1", hashes=HASHES))  # 33 uncached
    assert (over.mode, over.worker_id, over.cached_blocks) == ("prefill", "a", 4)
    zero = _policy(_index(d1=10), threshold=0)
    assert zero.route(_req(n=160, prev="d1")).mode == "local"  # fully cached: nothing to compute
    assert zero.route(_req(n=170, prev="d1")).mode == "prefill"


def test_kv_policy_session_blocks_stand_in_when_the_index_does_not_know_the_worker() -> None:
    pol = _policy(_index(a=2))
    plan = pol.route(_req(prev="d1", prev_blocks=9))  # the session record: d1 held 9 leading blocks
    assert (plan.mode, plan.worker_id, plan.cached_blocks) == ("local", "d1", 9)
    assert pol.route(_req(prev="d1", prev_blocks=7)).mode == "prefill"  # 48 uncached > 32
    # the index knowing more than the session wins (the larger count is used)
    assert pol.route(_req(prev="d2", prev_blocks=1)).mode == "prefill"
    rich = _policy(_index(a=2, d2=10))
    assert rich.route(_req(prev="d2", prev_blocks=1)).cached_blocks == 10


def test_kv_policy_no_session_picks_the_decode_candidate_holding_more_than_any_prefill_worker() -> None:
    pol = _policy(_index(a=8, d1=9, d2=10))
    plan = pol.route(_req(cands=("d1", "d2")))
    assert (plan.mode, plan.worker_id, plan.reason, plan.cached_blocks) == ("local", "d2", "decode_cache", 10)
    assert plan.fallbacks[0] == "a"
    # a candidate that holds no more than a prefill worker does is not worth it: prefill there
    tie = _policy(_index(a=10, d1=10))
    assert tie.route(_req(cands=("d1",))).mode == "prefill"
    # not a candidate (full, draining, gone): never planned
    assert pol.route(_req(cands=("d1",))).worker_id == "d1"
    assert pol.route(_req(cands=())).mode == "prefill"
    # over the threshold
    assert _policy(_index(d1=5)).route(_req(cands=("d1",))).mode == "prefill"


def test_kv_policy_without_hashes_uses_the_views_and_the_session() -> None:
    pol = KvAware(index=None, block_size=16, local_threshold_tokens=32, seed=1, pd_decider="threshold")
    views = [WorkerView("a", cached_blocks=3), WorkerView("b")]
    plan = pol.decide(_req(prev="d1", prev_blocks=9, hashes=None), views)
    assert (plan.mode, plan.worker_id) == ("local", "d1")
    plain = pol.decide(_req(prev="d1", prev_blocks=0, hashes=None), views)
    assert (plain.mode, plain.worker_id, plain.cached_blocks) == ("prefill", "a", 3)


def test_kv_policy_temperature_path_plans_local_too() -> None:
    pol = KvAware(index=_index(a=2, d1=10), block_size=16, local_threshold_tokens=32, temperature=1.0, seed=3)
    pol.ledger.report("a")
    pol.ledger.report("b")
    assert pol.route(_req(prev="d1")).worker_id == "d1"
    assert pol.route(_req(cands=("d1",))).reason == "decode_cache"


def test_kv_policy_oracle_asks_about_decode_candidates() -> None:
    asked: list[str] = []

    def cached(worker: str, request: RouteRequest) -> int:
        asked.append(worker)
        return {"a": 2, "d1": 10}.get(worker, 0)

    pol = Oracle(block_size=16, local_threshold_tokens=32, cached=cached, seed=1)
    plan = pol.decide(_req(cands=("d1",)), [WorkerView("a"), WorkerView("b")])
    assert (plan.mode, plan.worker_id) == ("local", "d1") and "d1" in asked
