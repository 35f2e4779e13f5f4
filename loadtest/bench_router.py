"""``kvrelay bench router``: the prefix index and the kv-aware decision, against Dynamo's RadixTree.

Workload (seeded): ``--workers`` workers hold conversations of ``--query-blocks`` blocks that
start with one of a few popular system prompts (held by many workers); each conversation
lives on one or two workers (routing affinity), until ``--blocks`` distinct blocks are
indexed. Queries are next turns: a conversation's history (a random number of its leading
blocks) followed by new blocks, plus some cold prompts; the walk stops at the first new block.

Each worker stores a system prompt once (a chain from the root) and then only its own blocks
under it (``parent`` = the prompt's last block), as an engine does when the prompt is cached.

Measured, in one process, on identical events and queries, ours and Dynamo's interleaved
(batch by batch for events, query by query, alternating who goes first, for decisions) so
machine load hits both alike; ``loadavg_1m`` is recorded before and after:
- events_per_s: blocks applied per second from encoded ``KvEventBatch`` bytes (decode included);
  Dynamo: ``RadixTree.apply_event`` on the same events as JSON (the same batches, timed alike).
- decision_us: ``KvAware.route`` on an already-hashed request (index match + cost over the
  workers' loads); Dynamo: ``find_matches`` on the same request's block hashes.
- hash_and_decision_us: from token ids (hashing included); Dynamo: ``compute_block_hash_for_seq``
  + ``find_matches``.
- match_us / match_linear_us: the index match alone, binary-search and linear walk (checked equal).
The garbage collector runs with its defaults, as in the router (no freeze, no tuning).

``--pin-cpu N`` binds the whole process (every thread, Dynamo's workers included) to one core.
Dynamo's Python binding hands each call to a worker thread: on an otherwise idle machine that
thread sleeps between calls and is woken on another core, which dominates its figures
(find_matches ~80 µs p50 unpinned, ~10 µs pinned, here); ours run on the calling thread and
barely change. Both conditions are worth reporting; ``machine.pinned_cpu`` records which ran.
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
from kvrelay.schemas.codec import unpack, pack
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
    ap.add_argument("--pin-cpu", type=int, default=None, help="bind the process to this core (see doc)")
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
    """Encoded KvEventBatch bytes (ours) and, per batch, the same events as Dynamo JSON."""
    a = w.a
    per_worker: list[list[tuple[KvEvent, bytes | None]]] = [[] for _ in range(a.workers)]
    compute = None
    if dyn:
        from dynamo._core import compute_block_hash_for_seq as compute
    held: list[set[int]] = [set() for _ in range(a.workers)]  # system prompts a worker holds
    sysb, blocks = a.system_blocks, 0
    for conv in range(w.conversations):
        toks = w.tokens(conv)
        ours = block_hashes(array("I", toks.tobytes()), w.bs, root)
        local = compute(toks.tolist(), w.bs) if compute else None
        prompt = w.prompt_of[conv]
        for worker in w.holders[conv]:
            start = sysb if prompt in held[worker] else 0
            held[worker].add(prompt)
            parent = ours[start - 1] if start else None
            ev = KvEvent.stored(ours[start:], parent=parent)
            blocks += len(ours) - start
            dj = None
            if local is not None:
                dj = json.dumps({"event_id": 0, "dp_rank": 0, "data": {"stored": {
                    "parent_hash": parent, "blocks": [{"block_hash": h, "tokens_hash": t}
                                                      for h, t in zip(ours[start:], local[start:])]}}})
            per_worker[worker].append((ev, dj))
    batches, dyn_batches = [], []
    for worker, events in enumerate(per_worker):
        for i in range(0, len(events), a.batch_events):
            chunk = events[i:i + a.batch_events]
            batches.append(pack(KvEventBatch(worker_id=f"w{worker}", epoch=1,
                                               event_id=i // a.batch_events + 1,
                                               spec=spec, events=[e for e, _ in chunk])))
            if dyn:  # event ids numbered per worker, as Dynamo expects
                dyn_batches.append([(worker, d.replace('"event_id": 0', f'"event_id": {i + k}', 1).encode())
                                    for k, (_, d) in enumerate(chunk)])
    return batches, dyn_batches, blocks


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


def _apply_events(batches: list[bytes], dyn_batches: list, spec: str, cap: int) -> tuple[PrefixIndex, Any, float, float]:
    """Apply every batch to our index and Dynamo's tree, interleaved, timing each side."""
    index = PrefixIndex(spec, max_blocks=cap)
    tree = None
    if dyn_batches:
        from dynamo._core import RadixTree

        tree = RadixTree()
    t_ours = t_dyn = 0.0
    clock = time.perf_counter
    for i, data in enumerate(batches):
        t = clock()
        index.apply(unpack(data, KvEventBatch))
        t_ours += clock() - t
        if tree is not None:
            apply = tree.apply_event
            t = clock()
            for wid, payload in dyn_batches[i]:
                apply(wid, payload)
            t_dyn += clock() - t
    return index, tree, t_ours, t_dyn


def _time_passes(passes: dict[str, Callable[[int], Any]], pairs: list[tuple[str, str]], n: int,
                 flush: Callable[[], None]) -> dict[str, list[float]]:
    """Per-call times. A pair (ours, theirs) runs query by query, alternating who goes first."""
    t: dict[str, list[float]] = {name: [] for name in passes}
    clock = time.perf_counter
    paired = {x for pair in pairs for x in pair}
    for ours, theirs in pairs:
        if theirs not in passes:
            continue
        for i in range(n):
            for name in ((ours, theirs) if i % 2 else (theirs, ours)):
                fn = passes[name]
                t0 = clock()
                fn(i)
                t[name].append(clock() - t0)
            if i % 64 == 63:
                flush()  # what apply() does between decisions in a live router
    for name, fn in passes.items():
        if name in paired and t[name]:
            continue
        for i in range(n):
            t0 = clock()
            fn(i)
            t[name].append(clock() - t0)
            if i % 64 == 63:
                flush()
    return t


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
    load0 = os.getloadavg()[0]
    spec = HashSpec(a.block_size)
    root = spec.root(tenant_salt("bench-secret", "tenant-a"))
    w = Workload(a)
    batches, dyn_batches, stored_blocks = _build_events(w, root, spec.fingerprint, dyn)
    gc.collect()
    rss0 = _rss_mb()
    index, tree, t_ours, t_dyn = _apply_events(batches, dyn_batches, spec.fingerprint,
                                               cap=max(a.blocks, 1) * 2)
    res: dict[str, Any] = {
        "bench": "router", "workers": a.workers, "blocks_indexed": len(index),
        "entries": index.stats()["entries"], "block_size": a.block_size, "query_blocks": a.query_blocks,
        "queries": a.queries, "events_per_s": round(stored_blocks / t_ours),
        "event_blocks": stored_blocks, "event_batches": len(batches),
        "index_mb": round(index.nbytes() / 2**20, 1), "index_impl": index.impl,
        "rss_delta_mb": round(_rss_mb() - rss0, 1), "index_max_blocks": index.max_blocks,
    }
    if tree is not None:
        res["dynamo"] = {"version": _dynamo_version(), "events_per_s": round(stored_blocks / t_dyn)}
    del batches, dyn_batches
    t, agree = _decisions(a, w, root, index, tree)
    res.update(_ours_figures(t, index))
    if tree is not None:
        res.update(_dynamo_figures(res, t, agree, a.queries))
    else:
        res["dynamo"] = None
        res["dynamo_skipped"] = dyn_reason
    res["gc"] = "defaults (no freeze, no tuning), as in the router"
    res["machine"] = {"cpus": os.cpu_count(), "pinned_cpu": a.pin_cpu, "python": platform.python_version(),
                      "platform": platform.machine(), "loadavg_1m_at_start": round(load0, 2),
                      "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}
    return res


def _decisions(a: argparse.Namespace, w: Workload, root: int, index: PrefixIndex,
               tree: Any) -> tuple[dict[str, list[float]], tuple[int, int]]:
    policy = KvAware(index=index, block_size=a.block_size, seed=a.seed)
    rng = random.Random(a.seed + 2)
    views = []
    for i in range(a.workers):
        q, act = rng.randrange(0, 20000), rng.randrange(0, 16)
        policy.ledger.report(f"w{i}", queued_tokens=q, active=act)
        views.append(WorkerView(f"w{i}", queued_tokens=q, active=act))
    queries = _queries(w, root, a.queries)
    reqs = [RouteRequest(request_id=str(i), tenant="tenant-a", num_tokens=len(toks), block_hashes=hashes)
            for i, (toks, hashes) in enumerate(queries)]
    bs = a.block_size

    def hash_and_route(i: int) -> None:
        toks = queries[i][0]
        policy.route(RouteRequest(request_id=str(i), tenant="tenant-a", num_tokens=len(toks),
                                  block_hashes=block_hashes(toks, bs, root)))

    passes: dict[str, Callable[[int], Any]] = {
        "decision": lambda i: policy.route(reqs[i]),
        "hash_decision": hash_and_route,
        "match": lambda i: index.match_masks(reqs[i].block_hashes),
        "match_linear": lambda i: index.match_masks_linear(reqs[i].block_hashes),
        "views": lambda i: policy.decide(reqs[i], views),
        "hash": lambda i: block_hashes(queries[i][0], bs, root),
    }
    if tree is not None:
        from dynamo._core import compute_block_hash_for_seq

        dyn_local = [compute_block_hash_for_seq(toks, w.bs) for toks, _ in queries]
        passes["d_decision"] = lambda i: tree.find_matches(dyn_local[i])
        passes["d_hash_decision"] = lambda i: tree.find_matches(compute_block_hash_for_seq(queries[i][0], bs))
    gc.collect()
    t = _time_passes(passes, [("decision", "d_decision"), ("hash_decision", "d_hash_decision")],
                     len(reqs), index.flush_touches)
    linear = sum(index.match_masks(h) == index.match_masks_linear(h) for _, h in queries)
    dyn_agree = 0
    if tree is not None:
        for i, (_, hashes) in enumerate(queries):
            theirs = {f"w{k[0]}": v for k, v in tree.find_matches(dyn_local[i]).scores.items() if v}
            dyn_agree += theirs == index.match(hashes)
    return t, (linear, dyn_agree)


def _ours_figures(t: dict[str, list[float]], index: PrefixIndex) -> dict[str, Any]:
    return {
        "decision_us_p50": _pct(t["decision"], 0.5), "decision_us_p99": _pct(t["decision"], 0.99),
        "match_us_p50": _pct(t["match"], 0.5), "match_us_p99": _pct(t["match"], 0.99),
        "match_linear_us_p50": _pct(t["match_linear"], 0.5),
        "decision_views_us_p50": _pct(t["views"], 0.5),
        "hash_us_p50": _pct(t["hash"], 0.5),
        "hash_and_decision_us_p50": _pct(t["hash_decision"], 0.5),
        "hash_and_decision_us_p99": _pct(t["hash_decision"], 0.99),
        "leave_ms": round(_timed(lambda: index.remove_worker("w0")) * 1e3, 1),
    }


def _dynamo_figures(res: dict[str, Any], t: dict[str, list[float]], agree: tuple[int, int],
                    n: int) -> dict[str, Any]:
    d = res["dynamo"]
    d.update({"decision_us_p50": _pct(t["d_decision"], 0.5),
              "decision_us_p99": _pct(t["d_decision"], 0.99),
              "hash_and_decision_us_p50": _pct(t["d_hash_decision"], 0.5),
              "hash_and_decision_us_p99": _pct(t["d_hash_decision"], 0.99)})
    return {
        "ratio_vs_dynamo": round(res["decision_us_p50"] / d["decision_us_p50"], 3),
        "hash_ratio_vs_dynamo": round(res["hash_and_decision_us_p50"] / d["hash_and_decision_us_p50"], 3),
        "events_ratio_vs_dynamo": round(res["events_per_s"] / d["events_per_s"], 3),
        "overlaps_agree_with_dynamo": f"{agree[1]}/{n}",
        "binary_match_agrees_with_linear": f"{agree[0]}/{n}",
    }


def _dynamo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-dynamo-runtime")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = _args(argv)
    if a.pin_cpu is not None and a.pin_cpu not in os.sched_getaffinity(0):
        print(f"bench router: --pin-cpu {a.pin_cpu} is not a core this process may use", file=sys.stderr)
        return 2
    if a.workers < 1 or a.blocks < 1 or a.queries < 1 or not 0 < a.system_blocks < a.query_blocks:
        print("bench router: need workers, blocks, queries >= 1 and 0 < system-blocks < query-blocks",
              file=sys.stderr)
        return 2
    if a.pin_cpu is not None:
        os.sched_setaffinity(0, {a.pin_cpu})  # before Dynamo is imported and starts threads: they inherit it
    res = {"command": " ".join(["kvrelay bench router", *argv]), **run(a)}
    text = json.dumps(res, indent=None if a.json else 2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
