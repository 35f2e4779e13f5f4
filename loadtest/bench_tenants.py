"""``kvrelay bench tenants``: fair admission when prefill capacity is contested, ``fair`` vs ``fifo``.

SIMULATED engines (``kvrelay up --engine sim``: real router, bus and worker services, prefill and
decode times from the ``cpu-smollm2`` cost model times ``--time-scale``). One deployment per
``router.admission_order``, with two tenants of equal weight (a tenants file, HTTP bearer keys):
``light`` and ``flood``. Capacity is the bottleneck: ``--prefill`` workers, each running one
prompt and queueing one more (``prefill.max_running=1``, ``prefill.max_queued=1``), so every other
waiting request waits in the router's admission queue (``router.max_waiting``), where the order
is decided. Requests: fresh random token-id prompts of ``--prompt-tokens`` (no prefix-cache hits),
``--output-tokens`` output tokens, streamed ``/v1/completions``.

Capacity C (requests/s) = prefill workers / the modelled prefill time of one prompt; a tenant's
share is C/2 (equal weights). Phases, on the same deployment:

1. ``solo``: the light tenant alone, Poisson at ``--light-load`` x its share, ``--solo-s``.
2. ``flood``: the same light arrivals, plus the flood tenant at ``--flood-factor`` x its share
   (Poisson), ``--flood-s``. 429s are not retried (counted); after the window the light requests
   are awaited, then the flood's outstanding ones are cancelled.
3. ``backlogged``: both tenants closed-loop, the light with ``--light-streams`` streams, the flood
   with ``--flood-factor`` times as many (429s retried after Retry-After): both keep requests
   waiting. Output tokens per tenant are counted over the window after ``--warmup-s``, while both
   tenants had a request waiting for its first token (sent, no first token yet).

Reported per order: the light tenant's TTFT p50/p99 (from the scheduled send) solo and under the
flood, and their ratio; errors per tenant; the share of output tokens per tenant while both were
backlogged (phases 2 and 3), against the weights. Targets: light TTFT p99 under the flood within
1.5x of solo; in phase 3, each tenant's output-token share within +-10 % of its weight share.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrelay.loadtest.clients import HttpClient
from kvrelay.loadtest.deployments import free_port, wait_healthy
from kvrelay.loadtest.metrics import Histogram, RequestRecord
from kvrelay.loadtest.plan import BenchRequest
from kvrelay.loadtest.report import emit
from kvrelay.up import Child
from kvrelay.workers.sim.cost import CostModel

TENANTS = ("light", "flood")
VOCAB = 40_000
Waits = dict[str, tuple[float, float]]  # tenant -> (sum, count) of its admission waits


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kvrelay bench tenants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", nargs="+", default=["fair", "fifo"], choices=["fair", "fifo"])
    ap.add_argument("--prefill", type=int, default=2, help="prefill workers")
    ap.add_argument("--time-scale", type=float, default=0.4, help="engine.sim_time_scale")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=8)
    ap.add_argument("--light-load", type=float, default=0.5, help="the light tenant's rate, in its shares")
    ap.add_argument("--flood-factor", type=float, default=10.0, help="the flood tenant's rate, in its shares")
    ap.add_argument("--light-streams", type=int, default=4,
                    help="closed-loop streams of the light tenant (phase 3)")
    ap.add_argument("--max-waiting", type=int, default=64, help="router.max_waiting")
    ap.add_argument("--solo-s", type=float, default=20.0)
    ap.add_argument("--flood-s", type=float, default=30.0)
    ap.add_argument("--backlogged-s", type=float, default=20.0)
    ap.add_argument("--warmup-s", type=float, default=3.0, help="phase 3: not counted at its start")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="(the report is always JSON)")
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/tenants_sim.json"))
    return ap.parse_args(argv)


# --- pure helpers ---------------------------------------------------------------------------------------
def capacity(a: argparse.Namespace) -> dict[str, float]:
    """Modelled prefill time of one prompt, requests/s the prefill workers serve, one tenant's share."""
    service_s = CostModel.preset("cpu-smollm2").prefill_s(a.prompt_tokens) * a.time_scale
    rate = a.prefill / service_s
    return {"prefill_s": service_s, "requests_per_s": rate, "share_per_s": rate / 2}


def backlogged(records: Sequence[RequestRecord], t0: float, t1: float) -> list[tuple[float, float]]:
    """The intervals within [t0, t1] where at least one request had been sent and had no first token."""
    events = []
    for r in records:
        if r.error and r.error.startswith("http_"):
            continue  # turned away (429): it never waited
        end = r.first_token_s() or r.end_s or t1
        if end > r.sent_s:
            events += [(r.sent_s, 1), (end, -1)]
    out, depth, start = [], 0, 0.0
    for t, d in sorted(events, key=lambda e: (e[0], e[1])):
        if depth == 0 and d > 0:
            start = t
        depth += d
        if depth == 0:
            out.append((start, t))
    return clip(out, t0, t1)


def clip(intervals: list[tuple[float, float]], t0: float, t1: float) -> list[tuple[float, float]]:
    return [(max(a, t0), min(b, t1)) for a, b in intervals if b > t0 and a < t1]


def intersect(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Both sorted lists of disjoint intervals: where both hold."""
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def tokens_in(records: Sequence[RequestRecord], intervals: list[tuple[float, float]]) -> int:
    """Output tokens (stream events) that arrived inside ``intervals``."""
    starts = [a for a, _ in intervals]
    n = 0
    for r in records:
        for t in r.token_times():
            i = bisect.bisect_right(starts, t) - 1
            n += i >= 0 and t <= intervals[i][1]
    return n


def shares(by_tenant: dict[str, Sequence[RequestRecord]], t0: float, t1: float,
           weights: dict[str, float]) -> dict[str, Any]:
    """Output tokens per tenant while every tenant was backlogged, and each one's share vs its weight's."""
    both = [(t0, t1)]
    for recs in by_tenant.values():
        both = intersect(both, backlogged(recs, t0, t1))
    tokens = {t: tokens_in(recs, both) for t, recs in by_tenant.items()}
    total, wsum = sum(tokens.values()), sum(weights.values())
    out: dict[str, Any] = {"both_backlogged_s": round(sum(b - a for a, b in both), 2),
                           "window_s": round(t1 - t0, 2), "output_tokens": tokens}
    out["share"] = {t: round(n / total, 3) if total else None for t, n in tokens.items()}
    out["share_vs_weight"] = {t: round(n / total / (weights[t] / wsum), 3) if total else None
                              for t, n in tokens.items()}
    return out


def ttft(records: Sequence[RequestRecord]) -> dict[str, Any]:
    h = Histogram()
    for r in records:
        if r.ok and r.ttft_ms() is not None:
            h.record_ms(max(0.0, r.ttft_ms() or 0.0))
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
    return {"requests": len(records), "ok": h.count, "errors": errors,
            "ttft_ms_p50": _r(h.percentile_ms(50)), "ttft_ms_p99": _r(h.percentile_ms(99)),
            "ttft_ms_max": _r(h.max_ms())}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


# --- load ------------------------------------------------------------------------------------------------
class Load:
    """Requests of fresh random prompts for one tenant's client."""

    def __init__(self, client: HttpClient, tenant: str, a: argparse.Namespace, rng: random.Random) -> None:
        self.client, self.tenant, self.a, self.rng, self.n = client, tenant, a, rng, 0

    def request(self) -> BenchRequest:
        self.n += 1
        prompt = [self.rng.randrange(3, VOCAB) for _ in range(self.a.prompt_tokens)]
        return BenchRequest(f"{self.tenant}-{self.n}", prompt, self.a.output_tokens, tenant=self.tenant)

    async def poisson(self, rate: float, t0: float, t1: float) -> list[tuple[float, asyncio.Task]]:
        """Send at Poisson times in [t0, t1) (open loop); (scheduled time, task) of each request."""
        sent: list[tuple[float, asyncio.Task]] = []
        t = t0 + self.rng.expovariate(rate)
        while t < t1:
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            sent.append((t, asyncio.create_task(self.client.send(self.request(), t))))
            t += self.rng.expovariate(rate)
        return sent

    async def closed(self, streams: int, t1: float) -> list[RequestRecord]:
        """``streams`` loops, each sending its next request when the previous one ends, until ``t1``."""
        async def loop() -> list[RequestRecord]:
            out = []
            while time.monotonic() < t1:
                out.append(await self.client.send(self.request(), time.monotonic()))
            return out

        runs = await asyncio.gather(*(loop() for _ in range(streams)))
        return [r for run in runs for r in run]


async def _records(sent: list[tuple[float, asyncio.Task]], cancel: bool = False) -> list[RequestRecord]:
    """The requests' records; with ``cancel``, those still running are cancelled (the client goes away)
    and recorded as errors "cancelled_at_end" (waiting from their send until now)."""
    if cancel:
        for _, task in sent:
            task.cancel()
    done = await asyncio.gather(*(task for _, task in sent), return_exceptions=True)
    now, out = time.monotonic(), []
    for (t, _), r in zip(sent, done):
        if not isinstance(r, RequestRecord):
            r = RequestRecord("cancelled", t, t, end_s=now, error="cancelled_at_end")
        out.append(r)
    return out


def _clients(url: str, keys: dict[str, str], a: argparse.Namespace) -> dict[str, HttpClient]:
    return {t: HttpClient(url, timeout_s=a.timeout_s, headers={"Authorization": f"Bearer {keys[t]}"},
                          retry_429=False) for t in TENANTS}


async def admission_waits(client: HttpClient) -> Waits:
    """The router's ``kvrelay_router_tenant_admission_wait_seconds``: tenant -> (sum, count)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with client.session.get(client.base + "/metrics") as r:
        text = await r.text()
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "kvrelay_router_tenant_admission_wait_seconds":
            continue
        for sample in family.samples:
            kind = {"kvrelay_router_tenant_admission_wait_seconds_sum": 0,
                    "kvrelay_router_tenant_admission_wait_seconds_count": 1}.get(sample.name)
            if kind is not None:
                out.setdefault(sample.labels["tenant"], [0.0, 0.0])[kind] = sample.value
    return {t: (v[0], v[1]) for t, v in out.items()}


def wait_delta(before: Waits, after: Waits) -> dict[str, Any]:
    """Requests that waited in the admission queue between two scrapes, and their mean wait (ms)."""
    out = {}
    for t, (total, n) in after.items():
        total0, n0 = before.get(t, (0.0, 0.0))
        waited = n - n0
        mean = round((total - total0) / waited * 1e3, 1) if waited else None
        out[t] = {"waited": int(waited), "mean_wait_ms": mean}
    return out


async def _flood_phase(load: dict[str, Load], a: argparse.Namespace,
                       rates: dict[str, float]) -> dict[str, Any]:
    """Phases 1 and 2: the light tenant alone, then beside the flood (open loop, no retries)."""
    t0 = time.monotonic()
    solo = await _records(await load["light"].poisson(rates["light"], t0, t0 + a.solo_s))
    await asyncio.sleep(1.0)  # the deployment settles
    waits0 = await admission_waits(load["light"].client)
    t0 = time.monotonic()
    t1 = t0 + a.flood_s
    light, flood = await asyncio.gather(load["light"].poisson(rates["light"], t0, t1),
                                        load["flood"].poisson(rates["flood"], t0, t1))
    light_recs = await _records(light)  # the light requests are awaited: the flood still waits meanwhile
    waits = wait_delta(waits0, await admission_waits(load["light"].client))
    flood_recs = await _records(flood, cancel=True)
    flooded = shares({"light": light_recs, "flood": flood_recs}, t0, t1, {t: 1.0 for t in TENANTS})
    return {"light_solo": ttft(solo), "light_under_flood": ttft(light_recs), "flood": ttft(flood_recs),
            "flood_phase_shares": flooded, "flood_phase_admission_waits": waits}


async def _backlogged_phase(load: dict[str, Load], a: argparse.Namespace) -> dict[str, Any]:
    """Phase 3: both tenants closed-loop (429s retried), output tokens per tenant while both wait."""
    for one in load.values():
        one.client.retry_429 = True
    t0 = time.monotonic()
    t1 = t0 + a.backlogged_s
    streams = {"light": a.light_streams, "flood": round(a.light_streams * a.flood_factor)}
    runs = await asyncio.gather(*(load[t].closed(streams[t], t1) for t in TENANTS))
    start = t0 + a.warmup_s
    both = shares(dict(zip(TENANTS, runs)), start, t1, {t: 1.0 for t in TENANTS})
    done = sum(r.ok and r.end_s is not None and start <= r.end_s <= t1 for run in runs for r in run)
    both["completed_per_s"] = round(done / max(1e-9, t1 - start), 2)
    both["streams"] = streams
    both["errors"] = {t: ttft(run)["errors"] for t, run in zip(TENANTS, runs)}
    return both


async def _phases(url: str, keys: dict[str, str], a: argparse.Namespace,
                  cap: dict[str, float]) -> dict[str, Any]:
    rng = random.Random(a.seed)
    clients = _clients(url, keys, a)
    for c in clients.values():
        await c.__aenter__()
    try:
        load = {t: Load(clients[t], t, a, rng) for t in TENANTS}
        rates = {"light": a.light_load * cap["share_per_s"], "flood": a.flood_factor * cap["share_per_s"]}
        for t in TENANTS:  # warm-up (connections, first dispatches): not counted
            for _ in range(2):
                await clients[t].send(load[t].request(), time.monotonic())
        result = await _flood_phase(load, a, rates)
        await asyncio.sleep(1.0)
        result["backlogged"] = await _backlogged_phase(load, a)
        result["rates_per_s"] = {t: round(r, 3) for t, r in rates.items()}
        return result
    finally:
        for c in clients.values():
            await c.__aexit__(None, None, None)


# --- deployment ------------------------------------------------------------------------------------------
def _up_argv(a: argparse.Namespace, order: str, port: int, tenants: Path) -> list[str]:
    sets = [f"engine.sim_time_scale={a.time_scale}", "prefill.max_running=1", "prefill.max_queued=1",
            f"router.max_waiting={a.max_waiting}", f'router.admission_order="{order}"',
            f"router.first_token_timeout_s={a.timeout_s}", "decode.max_slots=32"]
    return [sys.executable, "-m", "kvrelay.cli", "up", "--engine", "sim", "--model", "tiny",
            "--prefill", str(a.prefill), "--decode", "1", "--http-port", str(port), "--tenants", str(tenants),
            *[x for s in sets for x in ("--set", s)]]


async def run_order(order: str, a: argparse.Namespace, cap: dict[str, float], folder: Path) -> dict[str, Any]:
    from kvrelay.tenants_cli import add_tenant

    tenants = folder / f"tenants-{order}.json"
    keys = {t: add_tenant(tenants, t, weight=1.0, nats=False)[0] for t in TENANTS}
    port = free_port()
    argv = _up_argv(a, order, port, tenants)
    env = dict(os.environ, KVRELAY_RUN_DIR=str(folder / f"run-{order}"), KVRELAY_LOG_FORMAT="json")
    child = Child(f"up-{order}", argv, folder / f"up-{order}.log")
    url = f"http://127.0.0.1:{port}"
    await child.start(env)
    try:
        await wait_healthy(url + "/health", [child], 120.0)
        started = time.monotonic()
        result = await _phases(url, keys, a, cap)
        result["wall_s"] = round(time.monotonic() - started, 1)
        return result
    finally:
        await child.stop()


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    solo, under = result["light_solo"]["ttft_ms_p99"], result["light_under_flood"]["ttft_ms_p99"]
    ratio = round(under / solo, 2) if solo and under else None
    share = result["backlogged"]["share_vs_weight"]
    off = max((abs(v - 1) for v in share.values() if v is not None), default=None)
    solo50, under50 = result["light_solo"]["ttft_ms_p50"], result["light_under_flood"]["ttft_ms_p50"]
    return {"light_ttft_p50_ratio": round(under50 / solo50, 2) if solo50 and under50 else None,
            "light_ttft_p99_ratio": ratio, "light_ttft_p99_within_1_5x": ratio is not None and ratio <= 1.5,
            "backlogged_share_max_deviation": None if off is None else round(off, 3),
            "backlogged_share_within_10pct": off is not None and off <= 0.10}


def main(argv: list[str] | None = None) -> int:
    a = _args(sys.argv[1:] if argv is None else argv)
    cap = capacity(a)
    report: dict[str, Any] = {
        "what": "fair admission (router.admission_order) under a flooding tenant, simulated engines",
        "doc": __doc__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "capacity_model": {k: round(v, 4) for k, v in cap.items()},
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_before": round(os.getloadavg()[0], 2)}, "orders": {}}
    with tempfile.TemporaryDirectory(prefix="kvrelay-bench-tenants-") as tmp:
        for order in a.orders:
            result = asyncio.run(run_order(order, a, cap, Path(tmp)))
            result["targets"] = verdicts(result)
            report["orders"][order] = result
    report["machine"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    emit(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
