"""LoadLedger: admission bound, load counted at dispatch time, merged into worker views, rankings."""

from __future__ import annotations

import pytest

from kvrelay.router.ledger import DuplicateRequest, InflightFull, LoadLedger
from kvrelay.router.policy import LeastLoaded, RouteRequest, WorkerView
from kvrelay.schemas.messages import WorkerInfo


def _info(wid: str, queued_tokens: int = 0, draining: bool = False) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role="prefill", model="m", host="h", block_size=32,
                      queued_tokens=queued_tokens, draining=draining)


def test_ledger_admit_is_bounded_and_rejects_duplicates() -> None:
    t = LoadLedger(2)
    t.admit("a")
    with pytest.raises(DuplicateRequest):
        t.admit("a")
    t.admit("b")
    with pytest.raises(InflightFull):
        t.admit("c")
    t.release("a")
    t.admit("c")
    assert len(t) == 2


def test_ledger_counts_load_when_assigned_not_when_finished() -> None:
    t = LoadLedger(8)
    t.admit("r1")
    t.assign("r1", "w1", 100)
    assert t.load("w1") == (1, 100)
    t.admit("r2")
    t.assign("r2", "w1", 50)
    assert t.load("w1") == (2, 150)


def test_ledger_assign_moves_the_count_to_the_fallback_worker() -> None:
    t = LoadLedger(8)
    t.admit("r")
    t.assign("r", "w1", 100)
    t.unassign("r")
    assert t.load("w1") == (0, 0)
    t.assign("r", "w2", 100)
    t.assign("r", "w3", 100)  # assign again without unassign: moved, never counted twice
    assert t.load("w2") == (0, 0)
    assert t.load("w3") == (1, 100)


def test_ledger_prefill_done_frees_tokens_and_release_frees_the_request() -> None:
    t = LoadLedger(8)
    t.admit("r")
    t.assign("r", "w1", 100)
    t.prefill_done("r")
    assert t.load("w1") == (1, 0)
    assert t.release("r") == "w1"
    assert t.load("w1") == (0, 0)
    assert t.release("r") == ""  # idempotent
    t.prefill_done("r")
    t.assign("r", "w1", 5)  # unknown request: ignored
    assert t.load("w1") == (0, 0) and len(t) == 0


def test_ledger_views_merge_reported_load_and_skip_draining_workers() -> None:
    t = LoadLedger(8)
    t.admit("r")
    t.assign("r", "w1", 40)
    views = t.views([_info("w1", queued_tokens=10), _info("w2"), _info("w3", draining=True)])
    assert [(v.worker_id, v.queued_tokens, v.inflight, v.inflight_tokens) for v in views] == [
        ("w1", 10, 1, 40), ("w2", 0, 0, 0)]


def test_ledger_dispatch_time_counts_spread_a_burst_across_workers() -> None:
    """Nothing finishes during a burst: counting at dispatch time still spreads it evenly."""
    t, policy = LoadLedger(16), LeastLoaded(seed=3)
    infos = [_info("w1"), _info("w2"), _info("w3")]
    for i in range(9):
        rid = f"r{i}"
        t.admit(rid)
        plan = policy.decide(RouteRequest(rid, "default", 64), t.views(infos))
        t.assign(rid, plan.worker_id, 64)
    assert [t.load(w.worker_id) for w in infos] == [(3, 192)] * 3


def test_ledger_ranking_follows_every_change_in_one_place() -> None:
    t = LoadLedger(8)
    r = t.ranking(1.0, 10.0)
    t.views([_info("w1", queued_tokens=5), _info("w2")])
    assert r.order == [(0.0, "w2"), (5.0, "w1")] and r.members == 2
    t.admit("a")
    t.assign("a", "w2", 100, cached_tokens=40)
    assert r.cost("w2") == 60
    t.prefill_done("a")
    assert r.cost("w2") == 0
    t.assign("a", "w1", 7)  # moved: counted on w1 only
    assert (r.cost("w1"), r.cost("w2")) == (12.0, 0.0)
    t.release("a")
    assert r.order == [(0.0, "w2"), (5.0, "w1")]
    t.views([_info("w1"), _info("w2", draining=True)])
    assert "w2" not in r and r.order == [(0.0, "w1")] and r.members == 3


def test_ledger_views_take_in_other_routers_load() -> None:
    class Remote:
        def expire(self) -> None:
            pass

        def load(self, worker_id: str) -> tuple[int, int]:
            return (2, 300) if worker_id == "w1" else (0, 0)

    t = LoadLedger(8)
    t.remote = Remote()
    r = t.ranking(1.0, 0.0)
    t.admit("a")
    t.assign("a", "w1", 50)
    (view,) = t.views([_info("w1")])
    assert (view.inflight, view.inflight_tokens) == (3, 350) and r.cost("w1") == 350
    assert t.load("w1") == (1, 50)  # this router's own counts


def test_ledger_observe_counts_what_views_add_as_others_load() -> None:
    t = LoadLedger(8)
    r = t.ranking(1.0, 0.0)
    t.admit("a")
    t.assign("a", "w1", 50)
    t.observe([WorkerView("w1", queued_tokens=10, inflight=3, inflight_tokens=250)])
    assert r.cost("w1") == 260
    t.release("a")
    assert r.cost("w1") == 210  # the other 200 tokens are not this router's to release
    t.observe([])
    assert len(r) == 0 and t.load("w1") == (0, 0)


def test_ledger_counts_non_members_without_ranking_them() -> None:
    t = LoadLedger(8)
    r = t.ranking(1.0, 0.0)
    t.admit("a")
    t.assign("a", "d1", 30)  # a decode worker's local prefill
    assert t.load("d1") == (1, 30) and "d1" not in r
    t.release("a")
    assert t.load("d1") == (0, 0)
