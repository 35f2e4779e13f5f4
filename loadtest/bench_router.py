"""``kvrelay bench router``: the prefix index and the kv-aware decision, against Dynamo's RadixTree.

Workload (seeded): ``--workers`` workers hold conversations of ``--query-blocks`` blocks that
start with one of a few popular system prompts (held by many workers); each conversation
lives on one or two workers (routing affinity), until ``--blocks`` distinct blocks are
indexed. Queries are next turns: a conversation's history (a random number of its leading
blocks) followed by new blocks, plus some cold prompts; the walk stops at the first new block.

Measured, in one process, on identical events and queries:
- events_per_s: blocks applied per second from encoded ``KvEventBatch`` bytes (decode included);
  Dynamo: ``RadixTree.apply_event`` on the same events as JSON, until a query sees the last one.
- decision_us: ``KvAware.route`` on an already-hashed request (index walk + cost over the
  workers' loads); Dynamo: ``find_matches`` on the same request's block hashes.
- hash_and_decision_us: from token ids (hashing included); Dynamo: ``compute_block_hash_for_seq``
  + ``find_matches``.
Times are per call (perf_counter), ours and Dynamo's interleaved query by query; the heap built
for the index is frozen (``gc.freeze``) as a long-running router would do.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import random
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from kvrelay.router.index import PrefixIndex
from kvrelay.router.kv_policy import KvAware
from kvrelay.router.policy import RouteRequest, WorkerView
from kvrelay.schemas.codec import decode, encode
from kvrelay.schemas.hashing import HashSpec, block_hashes, tenant_salt
from kvrelay.schemas.kv_events import KvEvent, KvEventBatch

VOCAB = 49152


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kvrelay bench router", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=1_000_000, help="distinct blocks to index")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--query-blocks", type=int, default=64, help="blocks per conversation and query")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--system-prompts", type=int, default=16)
    ap.add_argument("--system-blocks", type=int, default=8)
    ap.add_argument("--batch-events", type=int, default=32, help="events per KvEventBatch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-dynamo", action="store_true", help="skip the Dynamo comparison")
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: also JSON)")
    ap.add_argument("--out", default="", help="also write the JSON here")
    return ap.parse_args(argv)


class Workload:
    """Token ids of system prompts and conversations, generated on demand from the seed."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.bs = a, a.block_size
        rng = np.random.default_rng(a.seed)
        self.system = [rng.integers(0, VOCAB, a.system_blocks * self.bs, dtype=np.uint32)
                       for _ in range(a.system_prompts)]
        own = a.query_blocks - a.system_blocks
        self.conversations = max(1, -(-(a.blocks - a.system_prompts * a.system_blocks) // own))
        prng = random.Random(a.seed)
        self.prompt_of = [prng.randrange(a.system_prompts) for _ in range(self.conversations)]
        self.holders = [prng.sample(range(a.workers), 1 + (prng.random() < 0.5))
                        for _ in range(self.conversations)]

    def tokens(self, conv: int) -> np.ndarray:
        own = np.random.default_rng((self.a.seed, conv)).integers(
            0, VOCAB, (self.a.query_blocks - self.a.system_blocks) * self.bs, dtype=np.uint32)
        return np.concatenate([self.system[self.prompt_of[conv]], own])

    def fresh(self, key: tuple, n_blocks: int) -> np.ndarray:
        rng = np.random.default_rng((self.a.seed, *key))
        return rng.integers(0, VOCAB, n_blocks * self.bs, dtype=np.uint32)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1e6, 2)


def _build_events(w: Workload, root: int, spec: str, dyn: bool) -> tuple[list[bytes], list, int]:
    """Encoded KvEventBatch bytes (ours) and JSON events (Dynamo's), identical content."""
    a = w.a
    per_worker: list[list[KvEvent]] = [[] for _ in range(a.workers)]
    dyn_events: list[tuple[int, list[tuple[int, int]]]] = []
    compute = None
    if dyn:
        from dynamo._core import compute_block_hash_for_seq as compute
    blocks = 0
    for conv in range(w.conversations):
        toks = w.tokens(conv)
        ours = block_hashes(array("I", toks.tobytes()), w.bs, root)
        local = compute(toks.tolist(), w.bs) if compute else None
        for worker in w.holders[conv]:
            per_worker[worker].append(KvEvent.stored(ours))
            blocks += len(ours)
            if local is not None:
                dyn_events.append((worker, list(zip(ours, local))))
    batches = []
    for worker, events in enumerate(per_worker):
        for i in range(0, len(events), a.batch_events):
            batches.append(encode(KvEventBatch(worker_id=f"w{worker}", epoch=1,
                                               event_id=i // a.batch_events + 1,
                                               spec=spec, events=events[i:i + a.batch_events])))
    return batches, dyn_events, blocks


def _queries(w: Workload, root: int, n: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, our hashes) of next-turn queries, 10 % cold."""
    rng = random.Random(w.a.seed + 1)
    out = []
    qb = w.a.query_blocks
    for i in range(n):
        if rng.random() < 0.1:
            toks = w.fresh((1, i), qb)
        else:
            conv = rng.randrange(w.conversations)
            keep = rng.randrange(w.a.system_blocks, qb + 1)
            toks = np.concatenate([w.tokens(conv)[: keep * w.bs], w.fresh((2, i), qb - keep)])
        tl = toks.tolist()
        out.append((tl, block_hashes(tl, w.bs, root)))
    return out


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _apply_ours(batches: list[bytes], spec: str, cap: int) -> tuple[PrefixIndex, float]:
    index = PrefixIndex(spec, max_blocks=cap)
    t = time.perf_counter()
    for data in batches:
        index.apply(decode(data, KvEventBatch))
    return index, time.perf_counter() - t


def _apply_dynamo(dyn_events: list, probe: tuple[int, list[int]]) -> tuple[Any, float]:
    from dynamo._core import RadixTree

    payloads = []
    next_id: dict[int, int] = {}
    for worker, blocks in dyn_events:
        eid = next_id.get(worker, 0)
        next_id[worker] = eid + 1
        ev = {"event_id": eid, "data": {"stored": {"parent_hash": None, "blocks": [
            {"block_hash": h, "tokens_hash": t} for h, t in blocks]}}, "dp_rank": 0}
        payloads.append((worker, json.dumps(ev).encode()))
    tree = RadixTree()
    worker, local = probe
    t = time.perf_counter()
    for wid, data in payloads:
        tree.apply_event(wid, data)
    while tree.find_matches(local).scores.get((worker, 0), 0) < len(local):  # the last event is in
        pass
    return tree, time.perf_counter() - t


def run(a: argparse.Namespace) -> dict[str, Any]:
    dyn_reason = ""
    dyn = not a.no_dynamo
    if dyn:
        try:
            importlib.import_module("dynamo._core")
        except ImportError as exc:
            dyn, dyn_reason = False, f"ai-dynamo-runtime is not installed ({exc})"
    else:
        dyn_reason = "--no-dynamo"
    spec = HashSpec(a.block_size)
    root = spec.root(tenant_salt("bench-secret", "tenant-a"))
    w = Workload(a)
    batches, dyn_events, stored_blocks = _build_events(w, root, spec.fingerprint, dyn)
    gc.collect()
    rss0 = _rss_mb()
    index, t_ours = _apply_ours(batches, spec.fingerprint, cap=max(a.blocks, 1) * 2)
    rss_index = _rss_mb() - rss0
    res: dict[str, Any] = {
        "bench": "router", "workers": a.workers, "blocks_indexed": len(index),
        "entries": index.stats()["entries"], "block_size": a.block_size, "query_blocks": a.query_blocks,
        "queries": a.queries, "events_per_s": round(stored_blocks / t_ours),
        "event_batches": len(batches), "index_rss_mb": round(rss_index, 1),
        "index_max_blocks": index.max_blocks,
    }
    policy = KvAware(index=index, block_size=a.block_size, seed=a.seed)
    rng = random.Random(a.seed + 2)
    views = []
    for i in range(a.workers):
        q, act = rng.randrange(0, 20000), rng.randrange(0, 16)
        policy.board.set(f"w{i}", queued_tokens=q, active=act)
        views.append(WorkerView(f"w{i}", queued_tokens=q, active=act))
    queries = _queries(w, root, a.queries)
    tree = None
    if dyn:
        from dynamo._core import compute_block_hash_for_seq

        conv = w.conversations - 1
        probe = (w.holders[conv][-1], compute_block_hash_for_seq(w.tokens(conv).tolist(), w.bs))
        tree, t_dyn = _apply_dynamo(dyn_events, probe)
        res["dynamo"] = {"version": _dynamo_version(), "events_per_s": round(stored_blocks / t_dyn)}
        dyn_local = [compute_block_hash_for_seq(toks, w.bs) for toks, _ in queries]
    del batches, dyn_events
    gc.collect()
    gc.freeze()
    reqs = [RouteRequest(request_id=str(i), tenant="tenant-a", num_tokens=len(toks), block_hashes=hashes)
            for i, (toks, hashes) in enumerate(queries)]

    def hash_and_route(i: int) -> None:
        toks = queries[i][0]
        policy.route(RouteRequest(request_id=str(i), tenant="tenant-a", num_tokens=len(toks),
                                  block_hashes=block_hashes(toks, a.block_size, root)))

    passes: dict[str, Callable[[int], Any]] = {
        "decision": lambda i: policy.route(reqs[i]),
        "match": lambda i: index.match_masks(reqs[i].block_hashes),
        "views": lambda i: policy.decide(reqs[i], views),
        "hash": lambda i: block_hashes(queries[i][0], a.block_size, root),
        "hash_decision": hash_and_route,
    }
    if tree is not None:
        passes["d_decision"] = lambda i: tree.find_matches(dyn_local[i])
        passes["d_hash_decision"] = lambda i: tree.find_matches(
            compute_block_hash_for_seq(queries[i][0], w.bs))
    # one pass per measurement, ours and Dynamo's alternating, every pass over the same queries
    order = ["decision", "d_decision", "hash_decision", "d_hash_decision", "match", "views", "hash"]
    t: dict[str, list[float]] = {}
    for name in [n for n in order if n in passes]:
        fn, times = passes[name], []
        for i in range(len(reqs)):
            times.append(_timed(lambda: fn(i)))
            if i % 64 == 63:
                index.flush_touches()  # what apply() does between decisions in a live router
        t[name] = times
    agree = 0
    if tree is not None:
        for i, (_, hashes) in enumerate(queries):
            theirs = {f"w{k[0]}": v for k, v in tree.find_matches(dyn_local[i]).scores.items() if v}
            agree += theirs == index.match(hashes)
    gc.unfreeze()
    res.update({
        "decision_us_p50": _pct(t["decision"], 0.5), "decision_us_p99": _pct(t["decision"], 0.99),
        "match_us_p50": _pct(t["match"], 0.5), "match_us_p99": _pct(t["match"], 0.99),
        "decision_views_us_p50": _pct(t["views"], 0.5),
        "hash_us_p50": _pct(t["hash"], 0.5),
        "hash_and_decision_us_p50": _pct(t["hash_decision"], 0.5),
        "hash_and_decision_us_p99": _pct(t["hash_decision"], 0.99),
        "leave_ms": round(_timed(lambda: index.remove_worker("w0")) * 1e3, 1),
    })
    if tree is not None:
        d = res["dynamo"]
        d.update({"decision_us_p50": _pct(t["d_decision"], 0.5),
                  "decision_us_p99": _pct(t["d_decision"], 0.99),
                  "hash_and_decision_us_p50": _pct(t["d_hash_decision"], 0.5),
                  "hash_and_decision_us_p99": _pct(t["d_hash_decision"], 0.99)})
        res["ratio_vs_dynamo"] = round(res["decision_us_p50"] / d["decision_us_p50"], 3)
        res["hash_ratio_vs_dynamo"] = round(
            res["hash_and_decision_us_p50"] / d["hash_and_decision_us_p50"], 3)
        res["events_ratio_vs_dynamo"] = round(res["events_per_s"] / d["events_per_s"], 3)
        res["overlaps_agree_with_dynamo"] = f"{agree}/{len(queries)}"
    else:
        res["dynamo"] = None
        res["dynamo_skipped"] = dyn_reason
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                      "platform": platform.machine(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}
    return res


def _dynamo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-dynamo-runtime")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    a = _args(sys.argv[1:] if argv is None else argv)
    if a.workers < 1 or a.blocks < 1 or a.queries < 1 or not 0 < a.system_blocks < a.query_blocks:
        print("bench router: need workers, blocks, queries >= 1 and 0 < system-blocks < query-blocks",
              file=sys.stderr)
        return 2
    res = run(a)
    text = json.dumps(res, indent=None if a.json else 2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
