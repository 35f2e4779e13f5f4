"""A kv_aware router killed (SIGKILL) under load and restarted rebuilds its prefix index from the
KV-events stream (replay, snapshots on gaps) and keeps routing by prefix; requests complete.

Real processes: a nats-server, two simulated prefill workers and one simulated decode worker
(``--engine sim``: real bus, real KV events, modelled compute), and the router.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kvrelay.transport.server import die_with_parent

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BS = 32
MAX_TOKENS = 4
WAIT_S = 60.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-P", "-m", "kvrelay.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus text (0 when it has none)."""
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def _until(cond, what: str, timeout: float = WAIT_S) -> None:
    async def loop() -> None:
        while not await cond():
            await asyncio.sleep(0.1)
    try:
        await asyncio.wait_for(loop(), timeout)
    except asyncio.TimeoutError:
        pytest.fail(f"timed out after {timeout} s waiting for {what}")


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.AsyncClient(timeout=30.0)
        self.retries = 0
        self.gate = asyncio.Event()  # retries wait for it: the test checks the index first
        self.gate.set()

    async def complete(self, prompt: list[int], deadline_s: float = WAIT_S) -> dict:
        """One completion; connection failures (router down) are retried until ``deadline_s``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        body = {"model": "kvrelay-tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        while True:
            try:
                r = await self.http.post(f"{self.url}/v1/completions", json=body)
                if r.status_code == 200:
                    return r.json()
                if r.status_code not in (429, 502, 503, 504):
                    pytest.fail(f"completion failed: {r.status_code} {r.text}")
            except httpx.TransportError:
                pass
            self.retries += 1
            if loop.time() > end:
                pytest.fail("a request did not complete across the router restart")
            await asyncio.sleep(0.1)
            await asyncio.wait_for(self.gate.wait(), max(0.1, end - loop.time()))

    async def metrics(self) -> str:
        try:
            return (await self.http.get(f"{self.url}/metrics")).text
        except httpx.TransportError:
            return ""

    async def healthy(self) -> bool:
        try:
            return (await self.http.get(f"{self.url}/health")).status_code == 200
        except httpx.TransportError:
            return False


def _prefixes(n: int, blocks: int) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(100, 40_000) for _ in range(blocks * BS)] for _ in range(n)]


async def test_router_restart_rebuilds_index_and_keeps_routing_by_prefix(nats_server, tmp_path: Path) -> None:
    port = _free_port()
    # a short KV-events stream: the restarted router replays what it retains and must ask the
    # workers for snapshots for what it dropped (a late first event id)
    events = {"max_msgs": 4, "max_bytes": 1 << 20, "max_age_s": 600.0, "discard": "old", "storage": "memory"}
    cfg = {"bus": {"url": nats_server.url, "namespace": f"rr{os.getpid()}", "kv_events": events},
           "cache": {"block_size": BS},
           "engine": {"kind": "sim", "sim_time_scale": 0.05, "sim_num_blocks": 4096,
                      "served_model_name": "kvrelay-tiny"},
           "router": {"policy": "kv_aware", "model": "tiny", "served_model_name": "kvrelay-tiny",
                      "http_port": port, "kv_w_queue": 0.01, "kv_w_decode": 0.0}}
    cfg_path = tmp_path / "kvrelay.json"
    cfg_path.write_text(json.dumps(cfg))
    base = ["--config", str(cfg_path)]
    procs = [_spawn(["prefill", *base, "--id", f"prefill-{i}", "--engine", "sim"],
                    tmp_path / f"prefill-{i}.log") for i in range(2)]
    procs.append(_spawn(["decode", *base, "--id", "decode-0", "--engine", "sim"], tmp_path / "decode-0.log"))
    router = _spawn(["router", *base, "--id", "router-0"], tmp_path / "router.log")
    client = Client(f"http://127.0.0.1:{port}")
    prefixes = _prefixes(6, blocks=4)
    try:
        await _until(client.healthy, "the router")
        # warm: each prefix once (its blocks land on one prefill worker), then load
        for p in prefixes:
            await client.complete(p + [7])
        await _until(lambda: _entries_at_least(client, 6 * 4), "the index to hold the prefixes")

        load = [asyncio.create_task(client.complete(p + [random.Random(i).randrange(100, 999)] * 3))
                for i, p in enumerate(prefixes * 4)]
        await _until(lambda: _inflight_at_least(client, 2), "requests in flight before the kill")
        client.gate.clear()  # no request reaches the new router before its index is checked
        router.send_signal(signal.SIGKILL)
        router.wait(10)
        router = _spawn(["router", *base, "--id", "router-0"], tmp_path / "router.log")
        await _until(client.healthy, "the restarted router")
        # before any new request: the index is rebuilt from the stream (all three workers)
        await _until(lambda: _workers_in_index(client, 3), "the rebuilt index to hold every worker")
        await _until(lambda: _entries_at_least(client, 6 * 4), "the rebuilt index to hold the prefixes")
        text = await client.metrics()
        assert _metric(text, "kvrelay_router_requests_total") == 0, "no request reached it yet"
        assert _metric(text, "kvrelay_router_kv_snapshots_total") >= 1, "the dropped head needs snapshots"
        assert _metric(text, "kvrelay_router_kv_index_stale_workers") == 0
        client.gate.set()
        done = await asyncio.wait_for(asyncio.gather(*load), WAIT_S)
        assert all(d["usage"]["completion_tokens"] == MAX_TOKENS for d in done)
        assert client.retries > 0, "the kill hit no request: it was not under load"
        # routed by prefix: each prefix goes back to the worker holding it (a full-prefix hit)
        for p in prefixes:
            out = await client.complete(p + [9, 9])
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= 4 * BS, out["usage"]
    finally:
        for proc in [router, *procs]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in [router, *procs]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        await client.http.aclose()


def _entries_at_least(client: Client, n: int):
    async def check() -> bool:
        return _metric(await client.metrics(), "kvrelay_router_kv_index_entries") >= n
    return check()


def _workers_in_index(client: Client, n: int):
    async def check() -> bool:
        return _metric(await client.metrics(), "kvrelay_router_kv_index_workers") >= n
    return check()


def _inflight_at_least(client: Client, n: int):
    async def check() -> bool:
        return _metric(await client.metrics(), "kvrelay_router_inflight") >= n
    return check()
