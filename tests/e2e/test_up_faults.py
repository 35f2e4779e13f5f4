"""Faults under `kvrelay up` (real processes, real signals): a decode worker killed mid-stream ends
each of its streams with exactly one clear error within the detection time, never with silence."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

STREAMS = 4
BODY = {"model": "kvrelay-tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 200,
        "stream": True}


def _pid(dep, name: str) -> int:
    started = next(line for line in dep.output if line.startswith("kvrelay: started"))
    return int(re.search(rf"{name} \(pid (\d+)\)", started).group(1))


async def _stream(url: str, started: asyncio.Event, deltas_before_kill: int) -> tuple[list, float]:
    """All events of one streamed completion, and when it ended (monotonic)."""
    events, deltas = [], 0
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.post(url + "/v1/chat/completions", json=BODY) as r:
        assert r.status == 200
        async for line in r.content:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
            deltas += isinstance(events[-1], dict) and bool(events[-1].get("choices"))
            if deltas >= deltas_before_kill:
                started.set()
    return events, time.monotonic()


async def test_up_faults_a_killed_decode_worker_ends_each_stream_with_one_error(start_up) -> None:
    dep = start_up(["--engine", "sim", "--set", "engine.sim_time_scale=1",
                    "--set", "supervise.backoff_initial_s=0.2"])
    flags = [asyncio.Event() for _ in range(STREAMS)]
    streams = [asyncio.create_task(_stream(dep.url, f, deltas_before_kill=3)) for f in flags]
    await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 60)  # every stream is decoding
    os.kill(_pid(dep, "decode-0"), signal.SIGKILL)
    killed = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*streams), 60)
    for events, ended in results:
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1, events[-3:]
        assert errors[0]["error"]["code"] == "worker_lost" and "decode-0" in errors[0]["error"]["message"]
        assert events[-1] == "[DONE]"
        # detection: the record's TTL (bus.worker_ttl_s, 3 s) or the restarted worker's new record,
        # plus one watch pass; well under the stall timeout (30 s) and the request deadline
        assert ended - killed < 10.0, ended - killed
    print(f"detection: {max(e for _, e in results) - killed:.2f} s after SIGKILL")
    dep.wait_for_line(r"decode-0 restarted")
    async with aiohttp.ClientSession() as s, s.post(dep.url + "/v1/chat/completions",
                                                    json=BODY | {"stream": False, "max_tokens": 4}) as r:
        assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 4


async def _client_loop(url: str, stop: asyncio.Event, results: list) -> None:
    """Streamed completions one after another until ``stop``; each result: (status, tokens, error)."""
    body = BODY | {"max_tokens": 24}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        while not stop.is_set():
            tokens, error = 0, None
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                async for line in r.content:
                    line = line.decode().strip()
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        error = event.get("error") or error
                        tokens += sum(bool(c["delta"].get("content")) for c in event.get("choices", []))
                results.append((r.status, tokens, error))


async def test_up_faults_a_rolling_restart_under_load_loses_nothing(start_up) -> None:
    """SIGTERM each worker in turn while clients stream: each drains and is restarted by `up`; a
    request meanwhile waits in the router's admission queue or the work queue, never fails."""
    dep = start_up(["--engine", "sim", "--set", "engine.sim_time_scale=0.05",
                    "--set", "supervise.backoff_initial_s=0.2"])
    stop, results = asyncio.Event(), []
    clients = [asyncio.create_task(_client_loop(dep.url, stop, results)) for _ in range(4)]
    try:
        for name in ("prefill-0", "decode-0"):
            done_before = len(results)
            os.kill(_pid(dep, name) if name == "prefill-0" else _current_pid(dep, name), signal.SIGTERM)
            await asyncio.to_thread(dep.wait_for_line, rf"{name} restarted \(pid (\d+)\)", 60)
            deadline = time.monotonic() + 60
            while len(results) < done_before + 8:  # requests kept completing across the restart
                assert time.monotonic() < deadline, f"no requests completed after {name} restarted"
                await asyncio.sleep(0.05)  # polling the clients' own results list, bounded above
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 120)
    bad = [r for r in results if r[0] != 200 or r[2] is not None or r[1] != 24]
    assert results and not bad, bad[:5]
    print(f"rolling restart: {len(results)} requests, 0 failed")


def _current_pid(dep, name: str) -> int:
    """The pid of ``name``: its latest restart's, else its first."""
    restarted = [re.search(rf"{name} restarted \(pid (\d+)\)", line) for line in dep.output]
    found = [m for m in restarted if m]
    return int(found[-1].group(1)) if found else _pid(dep, name)
