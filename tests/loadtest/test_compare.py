"""bench compare: presets, workload, verdict, report, the proxy (real aiohttp servers), CPU accounting;
and (marked e2e) the smoke preset with real vLLM processes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from kvrelay.loadtest.clients import HttpClient
from kvrelay.loadtest.compare import PRESETS, make, markdown, verdict
from kvrelay.loadtest.deployments import Disaggregated, EngineSettings
from kvrelay.loadtest.interference import InterferenceWorkload, run
from kvrelay.loadtest.metrics import RequestRecord
from kvrelay.loadtest.plan import BenchRequest
from kvrelay.loadtest.proxy import Balancer, Proxy

KEYS = ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "output_tok_per_s", "goodput")


def test_balancer_least_outstanding_with_round_robin_ties() -> None:
    b = Balancer(3)
    assert [b.acquire() for _ in range(3)] == [0, 1, 2]  # all tied: round robin
    b.release(1)
    assert b.acquire() == 1  # the only one with fewer in flight
    b.release(0)
    b.release(2)
    assert b.acquire() == 2 and b.acquire() == 0  # ties again, round robin continues after 1
    with pytest.raises(ValueError):
        Balancer(1).release(0)
    with pytest.raises(ValueError):
        Balancer(0)


def test_interference_workload_is_seeded_and_in_range() -> None:
    wl = InterferenceWorkload(decoders=2, long_rate=0.5, duration_s=30, seed=4)
    again = InterferenceWorkload(decoders=2, long_rate=0.5, duration_s=30, seed=4)
    a, b = wl.decode_plans(10), again.decode_plans(10)
    assert [p.steps[0].prompt_token_ids for p in a] == [p.steps[0].prompt_token_ids for p in b]
    for p in a:
        req = p.steps[0]
        assert 64 <= len(req.prompt_token_ids) <= 192 and 200 <= req.max_tokens <= 400
        assert req.kind == "decode"
    longs = wl.long_plans()
    assert longs and all(0 <= p.start_s < 30 for p in longs)
    assert all(1500 <= len(p.steps[0].prompt_token_ids) <= 3000 for p in longs)
    assert all(p.steps[0].kind == "long_prompt" for p in longs)
    assert [p.start_s for p in longs] == sorted(p.start_s for p in longs)
    with pytest.raises(ValueError):
        InterferenceWorkload(decoders=0, long_rate=0)
    with pytest.raises(ValueError):
        InterferenceWorkload(long_prompt=(3000, 1500))


def test_presets_fit_the_context_and_name_both_deployments() -> None:
    for p in PRESETS.values():
        w = p.workload
        assert w.long_prompt[1] + w.long_output[1] <= p.engine.max_model_len
        assert w.decode_prompt[1] + w.decode_output[1] <= p.engine.max_model_len
        assert p.deployments == ("aggregated", "disaggregated")


def test_disaggregated_puts_the_decode_kv_loader_on_the_prefill_cores(tmp_path: Path) -> None:
    dep = make("disaggregated", PRESETS["cpu-interference"], tmp_path)
    assert isinstance(dep, Disaggregated)
    prefill_core = dep.cores[0]
    assert f'decode.kv_load_cpus="{prefill_core}"' in dep.sets
    assert "decode.kv_load_cpus" in dep.describe()["pinning"]
    off = Disaggregated(EngineSettings(), tmp_path, load_on_prefill_cores=False, sets=("router.x=1",))
    assert off.sets == ("router.x=1",) and off.load_cpus == ""


def test_engine_settings_same_on_both_sides() -> None:
    e = EngineSettings(dtype="float32")
    v = e.vllm_args("/m")
    k = " ".join(e.kvrelay_sets())
    assert v[v.index("--dtype") + 1] == "float32" and 'engine.dtype="float32"' in k
    assert v[v.index("--max-num-seqs") + 1] == "16" and "engine.max_num_seqs=16" in k
    assert v[v.index("--kv-cache-memory-bytes") + 1] == str(1 << 30) and "engine.kv_cache_gb=1.0" in k
    assert v[v.index("--block-size") + 1] == "32" and "cache.block_size=32" in k


def test_engine_settings_auto_dtype_is_resolved_once_for_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" becomes the dtype kvrelay serves with on this CPU, and both deployments get that one."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bf16, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=bf16: b, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda b=bf16: b, raising=False)
        e = EngineSettings()
        v = e.vllm_args("/m")
        assert v[v.index("--dtype") + 1] == want and f'engine.dtype="{want}"' in " ".join(e.kvrelay_sets())


def _block(itl99: float, tput: float) -> dict:
    return {"ttft_ms_p50": 1.0, "ttft_ms_p99": 2.0, "itl_ms_p50": 3.0, "itl_ms_p99": itl99,
            "output_tok_per_s": tput, "goodput": 0.5, "completed": 9, "requests": 10,
            "errors": {"timeout": 1}}


@pytest.mark.parametrize("itl, tput, met", [(400.0, 95.0, True), (600.0, 95.0, False), (400.0, 85.0, False)])
def test_verdict_applies_the_target(itl: float, tput: float, met: bool) -> None:
    v = verdict(_block(1000.0, 100.0), _block(itl, tput))
    assert v["evaluated"] and v["met"] is met
    assert v["itl_p99_ratio"] == pytest.approx(itl / 1000.0)
    assert v["throughput_ratio"] == pytest.approx(tput / 100.0)


def test_verdict_and_markdown_with_a_failed_deployment() -> None:
    report = {"preset": "x", "description": "d", "conditions": {"model": "m"},
              "aggregated": _block(10.0, 5.0), "disaggregated": {"error": "kvrelay-up exited with code 1"}}
    report["verdict"] = verdict(report["aggregated"], report["disaggregated"])
    assert report["verdict"]["evaluated"] is False
    md = markdown(report)
    assert "| ITL p99 (ms) | 10.0 | did not run |" in md
    assert "| requests (ok/all) | 9/10 | did not run |" in md
    assert "not evaluated" in md


def test_markdown_of_an_unjudged_preset_has_no_target_line_and_shows_the_first_answer() -> None:
    assert not PRESETS["cpu-single"].judged and PRESETS["cpu-single"].aggregated_instances == 1
    report = {"preset": "cpu-single", "description": "d", "conditions": {"model": "m"},
              "aggregated": _block(10.0, 5.0) | {"first_answer_s": 21.5},
              "disaggregated": _block(12.0, 6.0) | {"first_answer_s": 48.0}}
    md = markdown(report)
    assert "Target" not in md
    assert "| start to first answer (s) | 21.5 | 48.0 |" in md


async def test_interference_run_sends_both_streams_until_duration() -> None:
    sent: list[BenchRequest] = []

    async def send(req: BenchRequest, scheduled: float) -> RequestRecord:
        sent.append(req)
        await asyncio.sleep(0.01)  # a fake server's service time (the run is bounded by duration)
        return RequestRecord(req.request_id, scheduled, scheduled, kind=req.kind, chunks=[(scheduled, 1)],
                             end_s=scheduled)

    wl = InterferenceWorkload(decoders=2, long_rate=50.0, duration_s=0.3, seed=1)
    records, counters = await run(send, wl)
    kinds = {r.kind for r in records}
    assert kinds == {"decode", "long_prompt"} and counters["scheduled"] == len(records) == len(sent)


# --- the proxy, in front of two real SSE backends --------------------------------------------------------
def _backend(name: str, gate: asyncio.Event | None = None,
             reached: asyncio.Event | None = None) -> web.Application:
    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + json.dumps({"choices": [{"text": name}]}).encode() + b"\n\n")
        if gate is not None and reached is not None:
            reached.set()
            await gate.wait()
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1}
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.json_response({})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m-" + name}]})

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[str, Proxy, asyncio.Event, asyncio.Event]]:
    gate, reached = asyncio.Event(), asyncio.Event()
    runners = []
    urls = []
    for name, g in (("a", gate), ("b", None)):
        r, u = await _serve(_backend(name, g, reached))
        runners.append(r)
        urls.append(u)
    proxy = Proxy(urls, max_inflight=8)
    r, u = await _serve(proxy.app())
    runners.append(r)
    try:
        yield u, proxy, gate, reached
    finally:
        gate.set()
        for r in reversed(runners):
            await r.cleanup()


async def test_proxy_streams_and_sends_to_least_outstanding(proxied: tuple) -> None:
    url, proxy, gate, reached = proxied
    req = BenchRequest("r", [1, 2, 3], 1)
    async with HttpClient(url) as client:
        assert client.model == "m-a"  # /v1/models from the first backend
        held = asyncio.create_task(client.send(req, client.clock()))  # backend a holds its stream open
        await asyncio.wait_for(reached.wait(), 10)
        assert proxy.balancer.outstanding == [1, 0]
        second = await client.send(req, client.clock())  # must go to b, the idle one
        assert second.ok and proxy.routed == [1, 1]
        gate.set()
        first = await held
    assert first.ok and first.output_tokens == 1 and first.prompt_tokens == 3
    assert proxy.balancer.outstanding == [0, 0]


async def test_proxy_health_and_capacity(proxied: tuple) -> None:
    import aiohttp

    url, proxy, _, _ = proxied
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/health") as r:
            assert r.status == 200 and all((await r.json())["backends"].values())
        proxy.max_inflight = 0
        async with s.post(url + "/v1/completions", json={"prompt": [1]}) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "1"


# --- CPU accounting of a shared machine ---------------------------------------------------------------------
def test_cpuwatch_counts_this_process_tree() -> None:
    import time

    from kvrelay.loadtest.cpuwatch import CpuWatch, own_tree_cpu_s

    w = CpuWatch()
    w.start()
    t = time.process_time()
    while time.process_time() - t < 0.3:  # burn CPU in this process
        pass
    got = w.stop()
    assert got["own_cpu_share"] is not None and got["own_cpu_share"] > 0
    assert 0 <= got["external_cpu_share"] <= 1.0
    assert own_tree_cpu_s() >= 0.3 - 0.05


async def test_wait_quiet_returns_at_once_when_the_limit_is_everything() -> None:
    from kvrelay.loadtest.cpuwatch import wait_quiet

    got = await wait_quiet(max_share=1.0, max_wait_s=5.0, window_s=0.2)
    assert got["quiet"] is True and got["waited_s"] == pytest.approx(0.2)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_compare_smoke_preset_runs_both_deployments(tmp_path: Path) -> None:
    """Real processes: 2 vLLM servers + proxy, then kvrelay up, with the tiny model (~2-3 min)."""
    from kvrelay.loadtest.compare import main

    rc = main(["--preset", "cpu-smoke", "--out", str(tmp_path), "--logs", str(tmp_path / "logs"),
               "--no-progress"])
    report = json.loads((tmp_path / "compare_cpu_smoke.json").read_text())
    assert rc == 0, {k: report[k].get("error") for k in ("aggregated", "disaggregated")}
    for name in ("aggregated", "disaggregated"):
        block = report[name]
        assert all(block[k] is not None for k in KEYS), block
        assert block["completed"] > 0 and block["output_tokens"] > 0
    assert "kv_aware" in report["disaggregated"]["deployment"]["router"]
    assert (tmp_path / "compare_cpu_smoke.md").read_text().startswith("# bench compare: cpu-smoke")
    assert (tmp_path / "compare_cpu_smoke_latency_cdf.png").stat().st_size > 0


def test_pin_tree_binds_every_thread_of_a_process_tree() -> None:
    import subprocess
    import sys

    from kvrelay.loadtest.deployments import find_in_tree, pin_tree, tree_affinity

    # a parent with a child, each with a few threads
    code = ("import subprocess, sys, threading, time; "
            "[threading.Thread(target=time.sleep, args=(60,), daemon=True).start() for _ in range(3)]; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'pin' + '-child']); "
            "sys.stdout.write('ready\\n'); sys.stdout.flush(); c.wait()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "ready\n"
        child = find_in_tree(parent.pid, "pin-child")
        assert child is not None and child != parent.pid
        assert pin_tree(parent.pid, 0) >= 5  # the parent's 4 threads and the child's
        assert tree_affinity(parent.pid) == ["0"]
        assert find_in_tree(parent.pid, "no-such-process") is None
    finally:
        parent.kill()
        parent.wait()


def test_disaggregated_threshold_variant_runs_the_load_blind_decider_and_is_judged_too(tmp_path: Path) -> None:
    p = PRESETS["cpu-interference"]
    dep = make("disaggregated-threshold", p, tmp_path)
    assert isinstance(dep, Disaggregated) and dep.name == "disaggregated-threshold"
    assert dep.sets[-1] == 'router.pd_decider="threshold"'  # after the preset's and --set's
    assert not any("pd_decider" in x for x in make("disaggregated", p, tmp_path).sets)  # kvrelay's default
    report = {"preset": "x", "description": "d", "conditions": {"model": "m"}, "aggregated": _block(1000.0, 100.0),
              "disaggregated": _block(400.0, 95.0), "disaggregated-threshold": _block(600.0, 95.0)}
    report["verdicts"] = {n: verdict(report["aggregated"], report[n]) for n in ("disaggregated",
                                                                                "disaggregated-threshold")}
    md = markdown(report)
    assert "| ITL p99 (ms) | 1000.0 | 400.0 | 600.0 |" in md
    assert "Target (disaggregated ITL p99 <= 0.5x aggregated, throughput >= 0.9x): ITL p99 ratio 0.4" in md
    assert "Target (disaggregated-threshold ITL p99" in md and "0.6, throughput ratio 0.95 -> NOT met" in md
