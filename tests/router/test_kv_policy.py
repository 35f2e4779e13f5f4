"""KvAware and Oracle: costs, dispatch-time load, ties, temperature, decode affinity. No I/O."""

from __future__ import annotations

from collections import Counter

import pytest

from kvrelay.router.config import RouterConfig
from kvrelay.router.index import PrefixIndex
from kvrelay.router.kv_policy import KvAware, Oracle
from kvrelay.router.ledger import LoadLedger
from kvrelay.router.policy import NoWorkers, RouteRequest, WorkerView
from kvrelay.schemas.hashing import HashSpec
from kvrelay.schemas.kv_events import KvEvent, KvEventBatch
from kvrelay.schemas.messages import WorkerInfo

SPEC = HashSpec(16).fingerprint
HASHES = list(range(100, 110))  # a 160-token prompt: 10 blocks of 16


def _index(**held: int) -> PrefixIndex:
    """Each worker holds the first N blocks of HASHES."""
    idx = PrefixIndex(SPEC)
    for wid, n in held.items():
        idx.apply(KvEventBatch(worker_id=wid, epoch=1, event_id=1, spec=SPEC,
                               events=[KvEvent.stored(HASHES[:n])]))
    return idx


def _policy(idx: PrefixIndex | None = None, **kw) -> KvAware:
    kw.setdefault("seed", 1)
    return KvAware(index=idx, block_size=16, **kw)


def _info(wid: str) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role="prefill", model="m", host="h", block_size=16)


def _req(n: int = 160, hashes: list[int] | None = HASHES, prev: str = "", rid: str = "r") -> RouteRequest:
    return RouteRequest(request_id=rid, tenant="t", num_tokens=n, block_hashes=hashes, previous_decode=prev)


def test_kv_aware_prefers_the_worker_holding_the_prefix() -> None:
    pol = _policy(_index(a=2, b=8))
    for w in "abc":
        pol.ledger.report(w)
    plan = pol.route(_req())
    assert plan.worker_id == "b" and plan.cached_blocks == 8 and plan.mode == "prefill"
    assert plan.cost == 160 - 8 * 16
    assert plan.fallbacks == ("a", "c") or plan.fallbacks[0] == "a"


def test_kv_aware_trades_cache_hits_against_queued_work() -> None:
    pol = _policy(_index(b=8))
    pol.ledger.report("a", queued_tokens=0)
    pol.ledger.report("b", queued_tokens=1000)  # 128 cached tokens do not pay for 1000 queued
    assert pol.route(_req()).worker_id == "a"
    pol.ledger.report("b", queued_tokens=100)
    assert pol.route(_req()).worker_id == "b"


def test_kv_aware_counts_active_decode_load() -> None:
    pol = _policy(w_decode=50.0)
    pol.ledger.report("a", active=3)
    pol.ledger.report("b", active=1)
    assert pol.route(_req(hashes=None)).worker_id == "b"


def test_kv_aware_counts_load_at_dispatch_time() -> None:
    pol = _policy(_index())
    pol.ledger.report("a")
    pol.ledger.report("b")
    first = pol.route(_req(rid="1"))
    pol.ledger.admit("1")
    pol.ledger.assign("1", first.worker_id, 160)
    second = pol.route(_req(rid="2"))
    assert second.worker_id != first.worker_id  # the first is busy before it reports anything
    pol.ledger.prefill_done("1")
    assert pol.ranking.cost(first.worker_id) == 0


def test_kv_aware_dispatch_counts_only_uncached_tokens() -> None:
    pol = _policy()
    pol.ledger.report("a")
    pol.ledger.admit("1")
    pol.ledger.assign("1", "a", 160, cached_tokens=128)
    assert pol.ranking.cost("a") == 32
    pol.ledger.release("1")  # failed
    assert pol.ranking.cost("a") == 0


def test_kv_aware_breaks_ties_at_random_seeded() -> None:
    def picks(seed: int) -> list[str]:
        pol = _policy(_index(), seed=seed)
        for w in "abcd":
            pol.ledger.report(w)
        return [pol.route(_req()).worker_id for _ in range(200)]

    counts = Counter(picks(3))
    assert set(counts) == set("abcd") and min(counts.values()) > 20
    assert picks(3) == picks(3) and picks(3) != picks(4)


def test_kv_aware_breaks_ties_among_cached_and_uncached_workers() -> None:
    pol = _policy(_index(a=2))
    pol.ledger.report("a", queued_tokens=32)  # 32 cached tokens, 32 queued: same cost as b and c
    pol.ledger.report("b")
    pol.ledger.report("c")
    assert {pol.route(_req()).worker_id for _ in range(100)} == {"a", "b", "c"}


def test_kv_aware_temperature_spreads_choices() -> None:
    pol = _policy(_index(a=8), temperature=1.0, seed=5)
    for w in "abc":
        pol.ledger.report(w)
    counts = Counter(pol.route(_req()).worker_id for _ in range(300))
    assert counts["a"] > counts["b"] and counts["b"] > 0 and counts["c"] > 0
    cold = _policy(_index(a=8))
    for w in "abc":
        cold.ledger.report(w)
    assert {cold.route(_req()).worker_id for _ in range(50)} == {"a"}


def test_kv_aware_local_prefill_on_previous_decode_worker() -> None:
    pol = _policy(_index(a=4, d1=9), local_threshold_tokens=32)
    pol.ledger.report("a")
    pol.ledger.report("b")
    plan = pol.route(_req(prev="d1"))  # d1 holds 144 of 160 tokens: 16 uncached <= 32
    assert plan.mode == "local" and plan.worker_id == "d1" and plan.cached_blocks == 9
    assert plan.fallbacks[0] == "a"  # if d1 refuses, the best prefill worker
    far = pol.route(_req(n=400, prev="d1"))  # 256 uncached > 32
    assert far.mode == "prefill" and far.worker_id == "a"
    assert pol.route(_req(prev="d9")).mode == "prefill"


def test_kv_aware_never_picks_a_decode_worker_for_prefill() -> None:
    pol = _policy(_index(d1=10))
    pol.ledger.report("a", queued_tokens=5000)
    plan = pol.route(_req())
    assert plan.worker_id == "a" and plan.cached_blocks == 0


def test_kv_aware_ignores_stale_workers() -> None:
    idx = _index(a=8)
    idx.apply(KvEventBatch(worker_id="a", epoch=1, event_id=5, spec=SPEC, events=[KvEvent.cleared()]))
    pol = _policy(idx)
    pol.ledger.report("a", queued_tokens=10)
    pol.ledger.report("b")
    assert pol.route(_req()).worker_id == "b"


def test_kv_aware_decide_uses_views_as_the_load_truth() -> None:
    pol = _policy(_index(b=10))
    views = [WorkerView("a"), WorkerView("b", queued_tokens=50, inflight_tokens=20)]
    assert pol.decide(_req(), views).worker_id == "b"  # 160 cached vs 70 queued
    views = [WorkerView("a"), WorkerView("b", queued_tokens=500)]
    assert pol.decide(_req(), views).worker_id == "a"
    assert pol.decide(_req(), [WorkerView("a")]).worker_id == "a"  # b is gone
    assert "b" not in pol.ranking


def test_kv_aware_decide_without_index_uses_view_cached_blocks() -> None:
    pol = _policy()
    views = [WorkerView("a", cached_blocks=0), WorkerView("b", cached_blocks=5, queued_tokens=40)]
    plan = pol.decide(_req(hashes=None), views)
    assert plan.worker_id == "b" and plan.cached_blocks == 5


def test_kv_aware_without_workers_raises() -> None:
    with pytest.raises(NoWorkers):
        _policy().decide(_req(), [])


def test_kv_aware_fallbacks_are_bounded_and_ordered() -> None:
    pol = _policy(_index(), max_fallbacks=2)
    for i, w in enumerate("abcde"):
        pol.ledger.report(w, queued_tokens=i * 10)
    plan = pol.route(_req())
    assert plan.worker_id == "a" and plan.fallbacks == ("b", "c")


def test_kv_aware_mask_and_dict_paths_agree() -> None:
    idx = _index(a=3, b=7, c=7, d=1)
    fast, slow = _policy(idx, seed=9), _policy(idx, seed=9)
    for i, w in enumerate("abcdef"):
        fast.ledger.report(w, queued_tokens=i * 13, active=i % 3)
        slow.ledger.report(w, queued_tokens=i * 13, active=i % 3)
    for n in (160, 200, 1000):
        a = fast.route(_req(n=n))
        b = slow.route(_req(n=n), overlap=idx.match(HASHES))
        assert (a.worker_id, a.cost, a.cached_blocks, a.fallbacks) == (b.worker_id, b.cost, b.cached_blocks,
                                                                     b.fallbacks)


def test_kv_aware_from_config_takes_the_weights() -> None:
    cfg = RouterConfig(kv_w_decode=7.0, kv_temperature=0.5, kv_local_threshold_tokens=64)
    pol = KvAware.from_config(cfg, None, block_size=32, seed=1)
    assert (pol.w_decode, pol.temperature, pol.local_threshold_tokens, pol.block_size) == (7.0, 0.5, 64, 32)


def test_kv_aware_bound_reads_the_dispatchers_ledger_without_updates() -> None:
    ledger = LoadLedger(8)
    pol = _policy(_index(b=8))
    pol.bind(ledger)
    ledger.views([_info("a"), _info("b")])
    ledger.admit("1")
    ledger.assign("1", "b", 1000)  # counted once, in the ledger: the policy sees it at once
    assert pol.route(_req()).worker_id == "a"
    views = ledger.views([_info("a"), _info("b")])
    assert pol.decide(_req(), views).worker_id == "a"  # the ledger's own views change nothing
    assert pol.ranking.cost("b") == 1000
    ledger.prefill_done("1")
    assert pol.route(_req()).worker_id == "b"


def test_oracle_uses_true_cache_contents() -> None:
    truth = {"a": 1, "b": 6}
    pol = Oracle(block_size=16, seed=1, cached=lambda w, r: truth.get(w, 0))
    pol.ledger.report("a")
    pol.ledger.report("b")
    plan = pol.route(_req(hashes=None))
    assert plan.worker_id == "b" and plan.cached_blocks == 6 and plan.reason == "oracle"


def test_oracle_decide_uses_cached_function_not_views() -> None:
    truth = {"a": 0, "b": 7}
    calls: list[str] = []

    def cached(w: str, r: RouteRequest) -> int:
        calls.append(w)
        return truth[w]

    pol = Oracle(block_size=16, seed=1, cached=cached)
    views = [WorkerView("a", cached_blocks=9), WorkerView("b", cached_blocks=0)]  # views lie
    plan = pol.decide(_req(hashes=None), views)
    assert plan.worker_id == "b" and plan.cached_blocks == 7 and set(calls) == {"a", "b"}


def test_oracle_decide_without_cached_function_raises() -> None:
    with pytest.raises(ValueError, match="cached"):
        Oracle(block_size=16).decide(_req(hashes=None), [WorkerView("a")])
