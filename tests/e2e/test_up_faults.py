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
