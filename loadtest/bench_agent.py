"""``kvrelay bench agent``: tool-calling agent loops through the HTTP API, on real engines.

    kvrelay bench agent --json [--model smollm2] [--agents 4] [--steps 10] [--kv-ttl-s T]

Starts a tool server on loopback (``tool_server.py``: ``calculator`` and ``lookup``, answering after
``--tool-latency-ms``), then per variant its own ``kvrelay up`` (1 prefill + 1 decode worker,
kv_aware, engines pinned to their cores) and runs the same seeded workload through the official
``openai`` client: ``--agents`` agents at once, each ``--steps`` streamed chat completions with
``tools`` and ``tool_choice="required"``, running the returned calls between steps and growing its
history toward the model's context limit (``agent_loop.py``), then a final answer
(``tool_choice="none"``), while unrelated prompts arrive at ``--background-rps`` (a Poisson
process of fresh random token ids through ``/v1/completions``: they fill the caches).

Variants: ``transfer`` (``router.kv_local_prefill=false``: every step through the prefill worker and
a KV transfer) and ``local`` (``=true``: a session's next step prefilled on its decode worker); both
with ``router.kv_local_threshold_tokens`` = ``--local-threshold-tokens`` (a step adds a few hundred
tokens). With ``--kv-ttl-s T`` > 0 each variant also runs as ``<variant>+ttl``, every request passing
``kv_ttl_s=T`` (a kvrelay extension).

Per variant (``agent_<model>.json`` in ``--out``; ``--json`` prints it): TTFT p50 / p90 per step
index and its ratio to step 1; prompt tokens sent vs computed (prompt - cached, from each response's
usage) for step 1 and for steps >= 2, with the tokens a cache could serve at best (what the agent's
previous request held: its prompt and output); KV bytes moved (``kvrelay_kv_bytes_moved_total`` over the
workers' /metrics, after - before: background requests included) and the router's local-prefill
counters; tool-call validity (the share of tool steps whose calls parsed and met their JSON
schemas, and the share that made the planned call); errors; and the targets: last step's TTFT p50
within 1.5x of step 1's, >= 90 % of prompt tokens cached after step 1, 100 % valid tool calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from kvrelay.loadtest.agent_loop import Agent, AgentConfig, StepRecord
from kvrelay.loadtest.agent_report import kv_bytes, metric_delta, report_block
from kvrelay.loadtest.metrics import RequestRecord
from kvrelay.loadtest.plan import BenchRequest

VARIANTS = {"transfer": ("router.kv_local_prefill=false",), "local": ("router.kv_local_prefill=true",)}


# --- background traffic -------------------------------------------------------------------------------------
class Background:
    """Unrelated prompts (fresh random token ids: no shared prefix) as a Poisson process of ``rps`` per
    second through ``send`` (``HttpClient.send``) from ``start()`` to ``stop()``; owns its tasks."""

    def __init__(self, send: Any, rps: float, seed: int = 0, prompt: tuple[int, int] = (256, 768),
                 output: tuple[int, int] = (16, 32), sleep: Any = asyncio.sleep,
                 clock: Any = time.monotonic) -> None:
        self._send, self.rps, self.seed, self.prompt, self.output = send, rps, seed, prompt, output
        self._sleep, self._clock = sleep, clock
        self.records: list[RequestRecord] = []
        self.sent = 0
        self._loop_task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self.cancelled = 0

    def start(self) -> None:
        if self.rps > 0 and self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        from kvrelay.loadtest.interference import VOCAB

        rng = np.random.default_rng([self.seed, 0xB6])
        while True:
            await self._sleep(float(rng.exponential(1.0 / self.rps)))
            n = int(rng.integers(self.prompt[0], self.prompt[1] + 1))
            req = BenchRequest(f"bg{self.sent}", rng.integers(0, VOCAB, n).tolist(),
                               int(rng.integers(self.output[0], self.output[1] + 1)), kind="background")
            self.sent += 1
            task = asyncio.create_task(self._one(req))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _one(self, req: BenchRequest) -> None:
        self.records.append(await self._send(req, self._clock()))

    async def stop(self) -> dict[str, Any]:
        """Stop sending, cancel what is in flight; the summary."""
        tasks = [t for t in (self._loop_task, *self._inflight) if t is not None]
        self._loop_task = None
        self.cancelled = sum(not t.done() for t in self._inflight)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.records if r.ok]
        return {"rps": self.rps, "sent": self.sent, "completed": len(ok), "cancelled_at_stop": self.cancelled,
                "prompt_tokens": sum(r.prompt_tokens for r in ok),
                "errors": dict(Counter(r.error for r in self.records if r.error is not None))}


# --- one variant --------------------------------------------------------------------------------------------
async def served(url: str) -> tuple[str, int | None]:
    """The served model's name and ``max_model_len`` (``GET /v1/models``)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.get(f"{url}/v1/models") as r:
            r.raise_for_status()
            first = (await r.json())["data"][0]
    return str(first["id"]), first.get("max_model_len")


async def run_agents(url: str, tools_url: str, cfg: AgentConfig, agents: int) -> list[StepRecord]:
    """``agents`` agents at once through the ``openai`` client; every step record."""
    import aiohttp
    import openai

    model, max_len = await served(url)
    if max_len:
        cfg = replace(cfg, max_context=min(cfg.max_context, int(max_len)))
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="kvrelay", max_retries=0, timeout=cfg.timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            loops = [Agent(client, model, i, tools_url, http, cfg) for i in range(agents)]
            results = await asyncio.gather(*(a.run() for a in loops))
    finally:
        await client.close()
    return [r for recs in results for r in recs]


def variant_sets(name: str, args: argparse.Namespace) -> tuple[str, ...]:
    """The ``kvrelay up --set`` values of variant ``name`` (``<variant>`` or ``<variant>+ttl``)."""
    return (*VARIANTS[name.split("+")[0]], f"router.kv_local_threshold_tokens={args.local_threshold_tokens}")


async def start_deployment(name: str, args: argparse.Namespace,
                           log_dir: Path) -> tuple[Any, str, dict[str, int]]:
    """Variant ``name``'s ``kvrelay up`` (its URL and the workers' metrics ports), started once more with
    fresh ports when one was taken meanwhile (``free_port`` finds a free port, it does not hold it)."""
    from kvrelay.loadtest.deployments import DeploymentError, Disaggregated, EngineSettings, free_port

    engine = EngineSettings(model=args.model, max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb)
    for attempt in (1, 2):
        ports = {"prefill": free_port(), "decode": free_port()}
        while ports["decode"] == ports["prefill"]:
            ports["decode"] = free_port()
        sets = (*variant_sets(name, args), *(f"{k}.metrics_port={p}" for k, p in ports.items()))
        folder = name.replace("+", "-") + ("" if attempt == 1 else "-retry")
        dep = Disaggregated(engine, log_dir / folder, prefill=1, decode=1, sets=sets)
        try:
            url = await dep.start()
        except DeploymentError as exc:  # start() stopped what it started
            if attempt == 2 or "address already in use" not in str(exc):
                raise
            print(f"kvrelay bench agent: {name}: a port was taken, starting again", file=sys.stderr)
            continue
        print(f"kvrelay bench agent: {name} is up at {url} ({dep.started_s:.0f}s)", file=sys.stderr)
        return dep, url, ports
    raise AssertionError("unreachable")


async def measure(url: str, ports: dict[str, int], cfg: AgentConfig, args: argparse.Namespace,
                  tools_url: str) -> dict[str, Any]:
    """Warm up, then the agents with background traffic; the variant's report block."""
    from kvrelay.loadtest import interference
    from kvrelay.loadtest.clients import HttpClient
    from kvrelay.loadtest.sessions_bench import scrape

    out: dict[str, Any] = {}
    urls = {"router": f"{url}/metrics", **{k: f"http://127.0.0.1:{p}/metrics" for k, p in ports.items()}}
    async with HttpClient(url, timeout_s=args.timeout_s) as bg_client:
        out["warmup_errors"] = sum(not r.ok for r in await interference.warmup(bg_client.send, 2))
        before = await scrape(urls)
        background = Background(bg_client.send, args.background_rps, args.seed)
        t0 = time.monotonic()
        background.start()
        try:
            records = await run_agents(url, tools_url, cfg, args.agents)
        finally:
            out["background"] = await background.stop()
        out["wall_s"] = round(time.monotonic() - t0, 1)
    delta = metric_delta(before, await scrape(urls))
    out |= report_block(records, args.steps)
    out["kv_bytes_moved"] = kv_bytes(delta)
    out["metrics"] = delta
    if args.save_steps:
        out["steps"] = [r.to_dict() for r in records]
    return out


async def run_variant(name: str, ttl: float, args: argparse.Namespace, log_dir: Path, tools_url: str) -> dict:
    from kvrelay.loadtest.deployments import DeploymentError

    cfg = AgentConfig(steps=args.steps, max_tokens=args.max_tokens, brief_tokens=args.brief_tokens,
                      filler_tokens=args.filler_tokens, max_context=args.max_model_len, kv_ttl_s=ttl,
                      final_answer=not args.no_final_answer, timeout_s=args.timeout_s, seed=args.seed)
    out: dict[str, Any] = {"sets": list(variant_sets(name, args)), "kv_ttl_s": ttl}
    try:
        dep, url, ports = await start_deployment(name, args, log_dir)
    except DeploymentError as exc:
        return out | {"error": str(exc)[-4000:]}
    try:
        out |= await measure(url, ports, cfg, args, tools_url)
    finally:
        await dep.stop()
    out["deployment"] = dep.describe()
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from kvrelay.loadtest.run import conditions
    from kvrelay.loadtest.tool_server import ToolServer, openai_tools

    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="kvrelay-agent-"))
    names = [(v, 0.0) for v in args.variants] + [(f"{v}+ttl", args.kv_ttl_s) for v in args.variants
                                                  if args.kv_ttl_s > 0]
    report: dict[str, Any] = {
        "kind": "kvrelay-bench-agent", "version": 1, "model": args.model, "variants": [n for n, _ in names],
        "conditions": conditions() | {
            "agents": args.agents, "steps": args.steps, "final_answer": not args.no_final_answer,
            "max_tokens": args.max_tokens, "brief_tokens": args.brief_tokens,
            "filler_tokens": args.filler_tokens, "seed": args.seed,
            "tool_latency_ms": args.tool_latency_ms, "background_rps": args.background_rps,
            "max_model_len": args.max_model_len, "tools": openai_tools(), "logs": str(log_dir),
            "client": "openai AsyncOpenAI, streamed chat completions, temperature 0, tool_choice required, "
                      "extra_body session_id (+ kv_ttl_s); TTFT = first content or tool-call delta"}}
    async with ToolServer(args.tool_latency_ms) as tools_url:
        for name, ttl in names:
            report[name] = await run_variant(name, ttl, args, log_dir, tools_url)
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kvrelay bench agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="kvrelay model name or folder (tiny for quick checks)")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["transfer", "local"])
    ap.add_argument("--agents", type=int, default=4, help="agents at once")
    ap.add_argument("--steps", type=int, default=10, help="tool steps per agent (a final answer follows)")
    ap.add_argument("--no-final-answer", action="store_true", help="no last step with tool_choice none")
    ap.add_argument("--tool-latency-ms", type=float, default=200.0)
    ap.add_argument("--kv-ttl-s", type=float, default=0.0, help="> 0: also run each variant passing kv_ttl_s")
    ap.add_argument("--background-rps", type=float, default=0.2, help="unrelated prompts/s (0: none)")
    ap.add_argument("--brief-tokens", type=int, default=1500, help="words of each agent's first message")
    ap.add_argument("--filler-tokens", type=int, default=200, help="words of detail per tool result")
    ap.add_argument("--max-tokens", type=int, default=96, help="per step")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0, help="per engine")
    ap.add_argument("--local-threshold-tokens", type=int, default=1024,
                    help="router.kv_local_threshold_tokens (a step adds a few hundred tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    ap.add_argument("--out", type=Path, default=Path("loadtest/results"),
                    help="folder for agent_<model>.json")
    ap.add_argument("--logs", type=Path, default=None, help="folder for the deployments' logs")
    ap.add_argument("--save-steps", action="store_true", help="every step's record in the report")
    ap.add_argument("--json", action="store_true", help="print the whole report")
    args = ap.parse_args(argv)
    for name in ("agents", "steps", "max_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("brief_tokens", "filler_tokens", "background_rps", "tool_latency_ms", "kv_ttl_s"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    report = asyncio.run(bench(args))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"agent_{Path(args.model).name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    names = report["variants"]
    print(json.dumps(report, indent=2) if args.json else
          json.dumps({n: report[n].get("targets", report[n].get("error")) for n in names}, indent=2))
    print(f"kvrelay bench agent: wrote {path}", file=sys.stderr)
    return 1 if any("error" in report[n] for n in names) else 0
