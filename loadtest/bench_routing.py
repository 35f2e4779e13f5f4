"""``kvrelay bench routing``: routing policies on a simulated cluster of prefill workers.

A discrete-event simulation on a virtual clock (nothing sleeps, so 64 workers and thousands of
requests take seconds). Each of ``--workers`` prefill workers is a real ``BlockManager`` (prefix
cache, LRU eviction, KV events) that computes one prompt at a time, for as long as the cost
model (``--preset``) says. In front of them, one router per policy with the real parts of
``router/``: ``LoadLedger`` (load counted at dispatch time, merged with heartbeats every
``BusConfig.heartbeat_s``), the policy's ``decide``, and, for ``kv_aware``, a ``PrefixIndex``
fed by the workers' own ``KvEventBatch`` messages (encoded and decoded as on the bus, delivered
``--event-delay-ms`` later). ``oracle`` is ``KvAware`` reading the block managers directly.

The workload (``loadtest.workloads``) is replayed the same way for every policy: sessions start
as a Poisson process at the rate where prefilling every prompt from scratch (no cache at all)
would keep ``--load`` of the workers' time busy in steady state; a session's next step arrives
when the previous one has finished (prefill, KV transfer, ``output_len`` decode steps at batch
``--decode-batch``) plus its think/tool pause.
A worker whose queue is full (``PrefillConfig`` bounds) refuses; the router tries the plan's
fallbacks, then retries after ``RouterConfig.intake_retry_delay_s``.

Not modelled: the router's ``max_inflight`` (every request is admitted), the export region's
capacity, and decode workers (a request's decode time is charged to its session's clock only).

Reported per policy: ``prefill_tokens_computed`` (prompt tokens not served from cache),
``cache_hit_rate`` (cached / prompt tokens), TTFT p50/p99 (arrival -> prefill done, queueing
included), throughput, and the load spread over workers.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import platform
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvrelay.loadtest.workloads import CONFIGS, Session, Workload, generate
from kvrelay.router.config import RouterConfig
from kvrelay.router.index import PrefixIndex
from kvrelay.router.ledger import LoadLedger
from kvrelay.router.kv_policy import KvAware, Oracle
from kvrelay.router.policy import LeastLoaded, Policy, RoundRobin, RouteRequest, RouteResult
from kvrelay.schemas.codec import unpack, pack
from kvrelay.schemas.hashing import HashSpec, tenant_salt
from kvrelay.schemas.kv_events import KvEventBatch
from kvrelay.schemas.messages import WorkerInfo
from kvrelay.transport.config import BusConfig
from kvrelay.workers.config import PrefillConfig
from kvrelay.workers.sim.blocks import BlockManager
from kvrelay.workers.sim.cost import PRESETS, CostModel

POLICIES = ("round_robin", "least_loaded", "kv_aware", "oracle")
SECRET = "bench-routing"  # the tenants' salt secret (any fixed value: routers and workers share it)


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kvrelay bench routing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(CONFIGS), default="agentic")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of the default")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-smollm2")
    ap.add_argument("--load", type=float, default=0.7, help="prefill time if nothing were cached / time")
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache per worker (default: preset's)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--event-delay-ms", type=float, default=10.0, help="KV event -> router index latency")
    ap.add_argument("--decode-batch", type=int, default=8, help="batch size that times the decode of outputs")
    for w in ("prefill", "queue", "decode"):
        ap.add_argument(f"--kv-w-{w}", type=float, default=None, help=f"override RouterConfig.kv_w_{w}")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--out", default="", help="also write the JSON here")
    a = ap.parse_args(argv)
    bad = set(a.policies.split(",")) - set(POLICIES)
    if bad or a.workers < 1 or a.requests < 1 or not a.load > 0 or a.decode_batch < 1:
        ap.error(f"unknown policies {sorted(bad)}, or workers, requests, load, decode-batch not > 0")
    return a


@dataclass
class Job:
    session: Session
    step: int
    arrival: float  # first offered to the router (TTFT counts from here)
    hashes: list[int]
    tokens: int
    worker: str = ""


class Worker:
    """A prefill worker: a block manager, a FIFO queue, one prompt computing at a time."""

    def __init__(self, wid: str, blocks: BlockManager) -> None:
        self.id, self.blocks = wid, blocks
        self.queue: deque[Job] = deque()
        self.queued_tokens = 0
        self.busy = False
        self.computed = 0
        self.busy_s = 0.0


class Cluster:
    """One policy's run over the workload (see the module doc)."""

    def __init__(self, a: argparse.Namespace, work: Workload, policy: str, cost: CostModel) -> None:
        self.a, self.work, self.cost, self.name = a, work, cost, policy
        self.spec = HashSpec(a.block_size)
        self.rc, self.pc, self.hb = router_config(a), PrefillConfig(), BusConfig().heartbeat_s
        num_blocks = cost.kv_cache_tokens(a.kv_cache_gb) // a.block_size
        self.workers = {f"p{i:03d}": Worker(f"p{i:03d}", BlockManager(
            num_blocks, a.block_size, worker_id=f"p{i:03d}", spec=self.spec.fingerprint, epoch=1))
            for i in range(a.workers)}
        self.index = None
        if policy == "kv_aware":
            self.index = PrefixIndex(self.spec.fingerprint, self.rc.kv_index_max_blocks)
        if self.index is None:
            for w in self.workers.values():
                w.blocks.sink = lambda ev: None  # nobody listens: drop events at the source
        self.policy = self._policy(policy)
        self.table = LoadLedger(1 << 30)
        self.policy.bind(self.table)
        self.infos = {wid: self._info(w) for wid, w in self.workers.items()}
        self.heap: list[tuple[float, int, Any, tuple]] = []
        self._seq = itertools.count()
        self.now, self.open = 0.0, 0
        self.ttft: list[float] = []
        self.prompt_tokens = self.cached_tokens = self.retries = self.index_batches = 0
        self.decide_s: list[float] = []
        self.last_done = 0.0
        self._hashes: dict[str, list[int]] = {}

    def _policy(self, name: str) -> Policy:
        if name == "round_robin":
            return RoundRobin()
        if name == "least_loaded":
            return LeastLoaded(seed=self.a.seed)
        if name == "kv_aware":
            return KvAware.from_config(self.rc, self.index, self.a.block_size, seed=self.a.seed)
        kv = KvAware.from_config(self.rc, None, self.a.block_size, seed=self.a.seed)
        return Oracle(block_size=kv.block_size, w_prefill=kv.w_prefill, w_queue=kv.w_queue,
                      w_decode=kv.w_decode, max_fallbacks=kv.max_fallbacks, seed=self.a.seed,
                      cached=lambda w, r: self.workers[w].blocks.cached_blocks(r.block_hashes or ()))

    def _info(self, w: Worker) -> WorkerInfo:
        return WorkerInfo(worker_id=w.id, role="prefill", model="sim", host="sim",
                          block_size=self.a.block_size, max_slots=1, active=int(w.busy), queued=len(w.queue),
                          queued_tokens=w.queued_tokens)

    # --- the event loop -----------------------------------------------------------------------
    def at(self, t: float, fn: Any, *args: Any) -> None:
        heapq.heappush(self.heap, (t, next(self._seq), fn, args))

    def run(self) -> dict[str, Any]:
        for s in self.work.sessions:
            self.open += len(s.steps)
            self.at(self.work.start_s(s), self.arrive, s, 0)
        self.at(0.0, self.heartbeat)
        t0 = time.perf_counter()
        while self.heap:
            t, _, fn, args = heapq.heappop(self.heap)
            self.now = t
            fn(*args)
        return self.report(time.perf_counter() - t0)

    def heartbeat(self) -> None:
        for wid, w in self.workers.items():
            i = self.infos[wid]
            if (i.active, i.queued, i.queued_tokens) != (int(w.busy), len(w.queue), w.queued_tokens):
                self.infos[wid] = self._info(w)
        if self.open:
            self.at(self.now + self.hb, self.heartbeat)

    def hashes(self, s: Session, step: int) -> list[int]:
        """The step's block hashes: a prefix of the session's (computed once per session)."""
        full = self._hashes.get(s.session_id)
        if full is None:
            full = self.spec.hashes(s.tokens, tenant_salt(SECRET, s.tenant))
            self._hashes[s.session_id] = full
        return full[: s.steps[step].prompt_len // self.a.block_size]

    def arrive(self, s: Session, step: int) -> None:
        n = s.steps[step].prompt_len
        self.dispatch(Job(s, step, self.now, self.hashes(s, step), n))

    def dispatch(self, job: Job) -> None:
        rid = f"{job.session.session_id}-{job.step}"
        request = RouteRequest(rid, job.session.tenant, job.tokens, block_hashes=job.hashes)
        if rid not in self.table:
            self.table.admit(rid)
        views = self.table.views(self.infos.values())
        t0 = time.perf_counter()
        plan = self.policy.decide(request, views)
        self.decide_s.append(time.perf_counter() - t0)
        for wid in (plan.worker_id, *plan.fallbacks):
            w = self.workers[wid]
            room = self.pc.max_queued_tokens - w.queued_tokens
            if len(w.queue) < self.pc.max_queued and job.tokens <= room:
                break
        else:
            self.retries += 1
            self.at(self.now + self.rc.intake_retry_delay_s, self.dispatch, job)
            return
        cached = plan.cached_blocks * self.a.block_size if wid == plan.worker_id else 0
        self.table.assign(rid, wid, job.tokens, cached)
        self.policy.update(RouteResult(rid, wid, "dispatched", job.tokens, cached))
        job.worker = wid
        w.queue.append(job)
        w.queued_tokens += job.tokens
        if not w.busy:
            self.start(w)

    def start(self, w: Worker) -> None:
        job = w.queue.popleft()
        w.queued_tokens -= job.tokens
        w.busy = True
        rid = f"{job.session.session_id}-{job.step}"
        cached = w.blocks.allocate(rid, job.hashes, job.tokens)
        new = job.tokens - cached
        seconds = self.cost.prefill_s(new, cached)
        w.computed += new
        w.busy_s += seconds
        self.prompt_tokens += job.tokens
        self.cached_tokens += cached
        if self.index is not None:
            while (batch := w.blocks.take_batch()) is not None:
                self.at(self.now + self.a.event_delay_ms / 1000, self.apply, pack(batch))
        self.at(self.now + seconds, self.finish, w, job)

    def apply(self, data: bytes) -> None:
        assert self.index is not None
        self.index.apply(unpack(data, KvEventBatch))
        self.index_batches += 1

    def finish(self, w: Worker, job: Job) -> None:
        rid = f"{job.session.session_id}-{job.step}"
        w.blocks.free(rid)
        w.busy = False
        self.ttft.append(self.now - job.arrival)
        self.table.prefill_done(rid)
        self.policy.update(RouteResult(rid, w.id, "finished"))
        st = job.session.steps[job.step]
        rest = (self.cost.kv_transfer_s(self.cost.kv_bytes(job.tokens))
                + st.output_len * self.cost.decode_step_s(self.a.decode_batch))
        self.at(self.now + rest, self.done, job)
        if w.queue:
            self.start(w)

    def done(self, job: Job) -> None:
        self.table.release(f"{job.session.session_id}-{job.step}")
        self.open -= 1
        self.last_done = self.now
        nxt = job.step + 1
        if nxt < len(job.session.steps):
            self.at(self.now + job.session.steps[nxt].delay_s, self.arrive, job.session, nxt)
        else:
            self._hashes.pop(job.session.session_id, None)  # the session is over

    # --- results ------------------------------------------------------------------------------
    def report(self, wall_s: float) -> dict[str, Any]:
        ttft = np.array(self.ttft) * 1000
        computed = [w.computed for w in self.workers.values()]
        span = max(self.last_done, 1e-9)
        out = {
            "prefill_tokens_computed": self.prompt_tokens - self.cached_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cache_hit_rate": round(self.cached_tokens / max(1, self.prompt_tokens), 4),
            "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 2),
            "ttft_p99_ms": round(float(np.percentile(ttft, 99)), 2),
            "ttft_mean_ms": round(float(ttft.mean()), 2),
            "requests": len(self.ttft),
            "requests_per_s": round(len(self.ttft) / span, 3),
            "prompt_tokens_per_s": round(self.prompt_tokens / span, 1),
            "makespan_s": round(span, 2),
            "utilization": round(sum(w.busy_s for w in self.workers.values()) / len(self.workers) / span, 3),
            "worker_load_max_over_mean": round(max(computed) / max(1e-9, float(np.mean(computed))), 3),
            "dispatch_retries": self.retries,
            "evicted_blocks": sum(w.blocks.counters["evicted_blocks"] for w in self.workers.values()),
            "decide_us_p50": round(float(np.percentile(self.decide_s, 50)) * 1e6, 1),
            "sim_wall_s": round(wall_s, 2),
        }
        if self.index is not None:
            counters = {k: v for k, v in self.index.counters.items() if v}
            out["index"] = {"batches": self.index_batches, **counters}
        return out


def router_config(a: argparse.Namespace) -> RouterConfig:
    """The router defaults, with the kv-aware weights given on the command line."""
    given = {f"kv_w_{w}": getattr(a, f"kv_w_{w}") for w in ("prefill", "queue", "decode")}
    return RouterConfig.from_mapping({k: v for k, v in given.items() if v is not None})


def _workload(a: argparse.Namespace, cost: CostModel) -> Workload:
    work = generate(a.workload, a.seed, max_requests=a.requests)
    # the session rate at which prefilling every prompt from scratch would keep `load` of the workers busy
    work_s = sum(cost.prefill_s(st.prompt_len) for s in work.sessions for st in s.steps)
    return work.with_rate(a.load * a.workers * len(work.sessions) / work_s)


def unbounded_reference(work: Workload, block_size: int) -> int:
    """Prefill tokens one worker with an unbounded cache would compute (sessions in start order):
    what no routing can beat by much. Each prompt reuses every full block any earlier one stored."""
    spec, seen, computed = HashSpec(block_size), set(), 0
    for s in work.sessions:
        full = spec.hashes(s.tokens, tenant_salt(SECRET, s.tenant))
        for st in s.steps:
            hashes = full[: st.prompt_len // block_size]
            hit = 0
            while hit < len(hashes) and hashes[hit] in seen:
                hit += 1
            computed += st.prompt_len - min(hit * block_size, st.prompt_len - 1)
            seen.update(hashes)
    return computed


def _targets(res: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if not {"round_robin", "least_loaded", "kv_aware", "oracle"} <= set(res):
        return {}
    kv, rr, orc, ll = (res[p] for p in ("kv_aware", "round_robin", "oracle", "least_loaded"))
    computed = "prefill_tokens_computed"
    t = {"kv_over_round_robin_prefill": round(kv[computed] / max(1, rr[computed]), 3),
         "kv_over_oracle_prefill": round(kv[computed] / max(1, orc[computed]), 3),
         "kv_over_least_loaded_ttft_p99": round(kv["ttft_p99_ms"] / max(1e-9, ll["ttft_p99_ms"]), 3)}
    t["met"] = (t["kv_over_round_robin_prefill"] <= 0.5 and t["kv_over_oracle_prefill"] <= 1.15
                and t["kv_over_least_loaded_ttft_p99"] <= 1.0)
    return t


def run(a: argparse.Namespace) -> dict[str, Any]:
    cost = CostModel.preset(a.preset)
    if a.kv_cache_gb is None:
        a.kv_cache_gb = cost.kv_cache_gb
    work = _workload(a, cost)
    need = max(st.prompt_len for s in work.sessions for st in s.steps)
    if cost.kv_cache_tokens(a.kv_cache_gb) < need:
        raise SystemExit(f"a {need}-token prompt does not fit a worker's KV cache ({a.kv_cache_gb} GB)")
    results = {p: Cluster(a, work, p, cost).run() for p in a.policies.split(",")}
    return {
        "bench": "routing", "workload": a.workload, "workers": a.workers, "seed": a.seed, "preset": a.preset,
        "load": a.load, "requests": work.num_requests, "sessions": len(work.sessions),
        "session_rate_per_s": round(work.rate, 4),
        "mean_prompt_tokens": round(work.prompt_tokens / work.num_requests),
        "kv_cache_tokens_per_worker": cost.kv_cache_tokens(a.kv_cache_gb), "block_size": a.block_size,
        "event_delay_ms": a.event_delay_ms, "decode_batch": a.decode_batch,
        "router": {k: v for k, v in router_config(a).to_mapping().items() if k.startswith("kv_w")},
        "unbounded_cache_prefill_tokens": unbounded_reference(work, a.block_size),
        "policies": results, "targets": _targets(results),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }


def _table(out: dict[str, Any]) -> str:
    cols = ("prefill_tokens_computed", "cache_hit_rate", "ttft_p50_ms", "ttft_p99_ms", "requests_per_s")
    lines = [f"workload={out['workload']} workers={out['workers']} requests={out['requests']} "
             f"preset={out['preset']} load={out['load']}",
             f"{'policy':<14}" + "".join(f"{c:>26}" for c in cols)]
    for p, r in out["policies"].items():
        lines.append(f"{p:<14}" + "".join(f"{r[c]:>26}" for c in cols))
    if out["targets"]:
        lines.append(f"targets: {out['targets']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = _args(sys.argv[1:] if argv is None else argv)
    out = run(a)
    text = json.dumps(out, indent=2)
    print(text if a.json else _table(out))
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
