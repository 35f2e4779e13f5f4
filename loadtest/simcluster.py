"""A discrete-event simulation of a serving cluster on a virtual clock, timed by a cost model.

SIMULATED: nothing here runs a model. Every duration comes from ``workers.sim.cost.CostModel``
(``forward_s``, ``kv_transfer_s``):

    prefill-only forward of c new tokens      prefill_fixed_s + c / prefill_tokens_per_s (+ attention)
    decode step of a batch of b sequences     decode_fixed_s + decode_per_seq_s * b
    mixed forward (b decodes + c prompt tokens, chunked prefill)
                                              decode_fixed_s + decode_per_seq_s * b + c / prefill_tokens_per_s
                                              (the weights are read once per forward: the fixed cost is paid
                                              once, as in the Sarathi-Serve analysis)
    KV transfer of a prompt                   transfer_latency_s
                                              + tokens * kv_bytes_per_token / transfer_bytes_per_s

**Aggregated** workers run vLLM-style continuous batching with chunked prefill: each iteration
carries one token for every running sequence plus up to ``chunk_tokens - running`` prompt tokens
of the waiting requests, first come first served. A request is admitted when its whole KV
(prompt + output) fits the worker's cache (``kv_cache_tokens``) and fewer than ``max_seqs`` run;
nothing is pre-empted. The router sends each request to the worker with the fewest outstanding
requests.

**Disaggregated**: ``prefill`` workers (fewest queued prompt tokens gets the request) run
prefill-only iterations with the same chunked scheduler; the first token leaves when a prompt's
prefill ends. Finished prefills wait in one FIFO queue that ``decode`` workers pull from when a
slot and KV room are free (kvrelay's pull-based decode); the KV transfer then takes
``kv_transfer_s`` before the sequence joins the next decode step. Prefill-side KV held until the
transfer is not capacity-limited.

Per request: TTFT (arrival -> first token), TPOT ((last - first token) / (output - 1)); ITL: every
token gap, pooled in an HDR histogram (``metrics.Histogram``). No prefix cache (every prompt token
is computed), no network or queueing delays besides the modelled ones.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvrelay.loadtest.metrics import Histogram
from kvrelay.workers.sim.cost import CostModel


@dataclass
class Req:
    rid: int
    arrival: float
    prompt: int
    output: int
    prefilled: int = 0
    first: float = -1.0
    done: float = -1.0
    finish_iter: int = 0  # the decode iteration of the worker that emits its last token


@dataclass
class SimConfig:
    cost: CostModel
    chunk_tokens: int = 8192  # tokens per forward (vLLM: max_num_batched_tokens)
    max_seqs: int = 512  # sequences per worker (vLLM: max_num_seqs)
    kv_tokens: int = 0  # KV cache per worker in tokens (0 = from the cost model)

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1 or self.max_seqs < 1:
            raise ValueError("chunk_tokens and max_seqs must be >= 1")
        if not self.kv_tokens:
            self.kv_tokens = self.cost.kv_cache_tokens()


@dataclass
class Stats:
    itl: Histogram = field(default_factory=Histogram)
    finished: list[Req] = field(default_factory=list)
    rejected: int = 0  # requests whose KV can never fit one worker


class Sim:
    """The event loop: a heap of (time, seq, callback)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._q: list[tuple[float, int, object]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: object) -> None:
        heapq.heappush(self._q, (t, next(self._seq), fn))

    def run(self) -> None:
        while self._q:
            t, _, fn = heapq.heappop(self._q)
            self.now = t
            fn()  # type: ignore[operator]


class Worker:
    """One engine instance: a waiting queue (prefill), a running batch (decode), a KV budget."""

    def __init__(self, sim: Sim, cfg: SimConfig, stats: Stats, decodes: bool) -> None:
        self.sim, self.cfg, self.cost, self.stats, self.decodes = sim, cfg, cfg.cost, stats, decodes
        self.waiting: deque[Req] = deque()
        self.running: list[tuple[int, int, Req]] = []  # heap by the iteration of the last token
        self.joining: list[Req] = []  # enter the running batch at the next iteration
        self.kv_used = 0
        self.iter = 0
        self.busy = False
        self.queued_tokens = 0  # prompt tokens not yet prefilled
        self.outstanding = 0  # requests submitted or taken and not finished here
        self.on_prefilled: Callable[[Req], None] | None = None  # prefill-only workers hand requests on
        self.on_finish: Callable[[], None] | None = None  # decode workers: a slot and KV were freed

    def submit(self, r: Req) -> None:
        if r.prompt + r.output > self.cfg.kv_tokens:
            self.stats.rejected += 1
            return
        self.waiting.append(r)
        self.queued_tokens += r.prompt
        self.outstanding += 1
        if not self.busy:
            self._start()

    def _admit(self, r: Req) -> bool:
        """Reserve the request's KV when it starts prefilling (nothing is pre-empted later)."""
        if r.prefilled:
            return True
        need = r.prompt + (r.output if self.decodes else 0)
        busy = len(self.running) + len(self.joining)
        if self.kv_used + need > self.cfg.kv_tokens or busy >= self.cfg.max_seqs:
            return False
        self.kv_used += need
        return True

    def _start(self) -> None:
        joined = self.joining
        for r in joined:  # it emits tokens at iterations iter+1 .. iter+output-1
            heapq.heappush(self.running, (self.iter + r.output - 1, r.rid, r))
        self.joining = []
        b = len(self.running)
        budget = self.cfg.chunk_tokens - b
        pieces: list[tuple[Req, int]] = []
        for r in self.waiting:
            if budget <= 0 or not self._admit(r):
                break
            take = min(budget, r.prompt - r.prefilled)
            pieces.append((r, take))
            budget -= take
        c = sum(n for _, n in pieces)
        if not b and not c:
            self.busy = False
            return
        d = self.cost.forward_s(b, [(n, r.prefilled) for r, n in pieces])
        self.busy = True
        self.sim.at(self.sim.now + d, lambda: self._end(d, pieces, b, joined))

    def _end(self, d: float, pieces: list[tuple[Req, int]], b: int, joined: list[Req]) -> None:
        now = self.sim.now
        self.iter += 1
        # every running sequence got a token: d after its previous one, except the ones that just
        # joined, whose previous token is their first (from the prefill, maybe on another worker)
        if b > len(joined):
            self.stats.itl.record_ms(d * 1e3, b - len(joined))
        for r in joined:
            self.stats.itl.record_ms((now - r.first) * 1e3)
        while self.running and self.running[0][0] <= self.iter:
            self._finish(heapq.heappop(self.running)[2], now)
        for r, n in pieces:
            r.prefilled += n
            self.queued_tokens -= n
            if r.prefilled < r.prompt:
                continue
            self.waiting.popleft()  # the pieces are a prefix of the waiting queue
            r.first = now
            if not self.decodes:
                self.kv_used -= r.prompt
                self.outstanding -= 1
                assert self.on_prefilled is not None
                self.on_prefilled(r)
            elif r.output <= 1:
                self._finish(r, now)
            else:
                self.joining.append(r)
        self._start()

    def _finish(self, r: Req, now: float) -> None:
        r.done = now
        self.kv_used -= r.prompt + r.output
        self.outstanding -= 1
        self.stats.finished.append(r)
        if self.on_finish is not None:
            self.on_finish()

    # --- decode workers of a disaggregated cluster --------------------------------------------------
    def room_for(self, r: Req) -> bool:
        return (self.kv_used + r.prompt + r.output <= self.cfg.kv_tokens
                and self.outstanding < self.cfg.max_seqs)

    def take(self, r: Req, transfer_s: float) -> None:
        """A pulled prefilled request: its KV arrives ``transfer_s`` later, then it decodes."""
        self.kv_used += r.prompt + r.output
        self.outstanding += 1

        def arrived() -> None:
            if r.output <= 1:
                self._finish(r, self.sim.now)
                return
            self.joining.append(r)
            if not self.busy:
                self._start()

        self.sim.at(self.sim.now + transfer_s, arrived)


def simulate(reqs: list[Req], cfg: SimConfig, workers: int, prefill: int = 0) -> Stats:
    """Run every request to completion; ``prefill`` = 0: aggregated, else P prefill + the rest decode."""
    if workers < 1 or not 0 <= prefill < workers:
        raise ValueError(f"need workers >= 1 and 0 <= prefill < workers, got {workers}, {prefill}")
    sim, stats = Sim(), Stats()
    if not prefill:
        pool = [Worker(sim, cfg, stats, decodes=True) for _ in range(workers)]

        def route(r: Req) -> None:
            min(pool, key=lambda w: w.outstanding).submit(r)
    else:
        pws = [Worker(sim, cfg, stats, decodes=False) for _ in range(prefill)]
        dws = [Worker(sim, cfg, stats, decodes=True) for _ in range(workers - prefill)]
        ready: deque[Req] = deque()

        def pull() -> None:
            while ready:
                w = min((w for w in dws if w.room_for(ready[0])), key=lambda w: w.outstanding, default=None)
                if w is None:
                    return
                r = ready.popleft()
                w.take(r, cfg.cost.kv_transfer_s(cfg.cost.kv_bytes(r.prompt)))

        def prefilled(r: Req) -> None:
            ready.append(r)
            pull()

        for w in pws:
            w.on_prefilled = prefilled
        for w in dws:
            w.on_finish = pull

        def route(r: Req) -> None:
            min(pws, key=lambda w: w.queued_tokens).submit(r)
    for r in reqs:
        sim.at(r.arrival, lambda r=r: route(r))
    sim.run()
    return stats
