"""`kvrelay up` end to end for agents: a session's KV kept on its decode worker across a tool pause.

A step that asks (``kv_ttl_s``) keeps its blocks pinned on the decode worker that ran it; other
traffic that fills the KV cache meanwhile evicts everything else, and the session's next step is
still a prefix-cache hit there. A session that did not ask is recomputed.
"""

from __future__ import annotations

import random
import socket

import httpx
import pytest

pytestmark = pytest.mark.e2e

MODEL = "kvrelay-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["alpha", "bravo", "delta", "echo", "golf", "hotel", "kilo", "lima", "mike",
                                "oscar", "papa", "romeo", "sierra", "tango", "victor", "zulu"]) + str(rng.randrange(100))
                    for _ in range(n))


def _chat(url: str, messages: list[dict], session: str, ttl: float | None) -> dict:
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, "session_id": session}
    if ttl is not None:
        body["kv_ttl_s"] = ttl
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_up_agents_pinned_session_kv_survives_cache_pressure(start_up, metric) -> None:
    port = _free_port()
    # the smallest KV cache an engine takes (0.05 GiB: ~26k tiny-model tokens), filled below ~1.5 times over
    dep = start_up(["--set", "engine.kv_cache_gb=0.05", "--set", "engine.max_model_len=2048",
                    "--set", 'engine.dtype="float32"', "--set", f"decode.metrics_port={port}"])
    rng = random.Random(7)
    steps = {}
    for session, ttl in (("pinned", 120.0), ("unpinned", None)):
        messages = [{"role": "user", "content": _words(rng, 300)}]
        first = _chat(dep.url, messages, session, ttl)
        messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "The tool said: 42. Go on."}]
        steps[session] = (first["usage"]["prompt_tokens"], messages)
    flood = httpx.Client(timeout=300)
    for i in range(40):  # 40 unrelated 1,000-token prompts: every unpinned block is evicted
        ids = [rng.randrange(1000, 40000) for _ in range(1000)]
        r = flood.post(f"{dep.url}/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 2})
        assert r.status_code == 200, r.text
    cached = {}
    for session, (prompt_tokens, messages) in steps.items():
        second = _chat(dep.url, messages, session, None)
        cached[session] = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    pinned_prompt = steps["pinned"][0]
    assert cached["pinned"] >= pinned_prompt - 32, (cached, pinned_prompt)  # all but a partial block or two
    assert cached["unpinned"] < steps["unpinned"][0] // 2, cached
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(text, "kvrelay_decode_kv_pins_total", outcome="pinned") >= 1
    assert metric(text, "kvrelay_decode_kv_pins_total", outcome="hit") >= 1
