"""`kvrelay up` supervises its children: a killed worker is restarted while the rest keep serving, and
a child that uses up its restarts stops the deployment with an error (real processes, real signals)."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request

import pytest

pytestmark = pytest.mark.e2e

SIM = ["--engine", "sim", "--set", "engine.sim_time_scale=0"]


def _pid(dep, name: str) -> int:
    started = next(line for line in dep.output if line.startswith("kvrelay: started"))
    return int(re.search(rf"{name} \(pid (\d+)\)", started).group(1))


def _chat(dep) -> dict:
    body = json.dumps({"model": "kvrelay-tiny", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4}).encode()
    req = urllib.request.Request(dep.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_up_supervise_restarts_a_killed_decode_worker_and_keeps_serving(start_up) -> None:
    dep = start_up([*SIM, "--set", "supervise.backoff_initial_s=0.2"])
    old = _pid(dep, "decode-0")
    os.kill(old, signal.SIGKILL)
    dep.wait_for_line(r"decode-0 exited unexpectedly \(code -9\); restart 1 in 0\.2s")
    new = int(dep.wait_for_line(r"decode-0 restarted \(pid (\d+)\)").group(1))
    assert new != old
    # the prefill worker and the router kept running; the new decode worker pulls this request's handover
    out = _chat(dep)
    assert out["choices"][0]["message"]["content"] and out["usage"]["completion_tokens"] == 4
    assert dep.proc.poll() is None
    assert dep.stop() == 0


def test_up_supervise_a_child_out_of_restarts_stops_the_deployment(start_up) -> None:
    dep = start_up([*SIM, "--set", "supervise.max_restarts=0"])
    os.kill(_pid(dep, "prefill-0"), signal.SIGKILL)
    dep.wait_for_line(r"prefill-0 exited unexpectedly \(code -9\) and used up its restarts")
    assert dep.proc.wait(90) == 1
