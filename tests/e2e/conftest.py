"""A real deployment for end-to-end tests: `kvrelay up` as a child process, talked to over HTTP and NATS."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvrelay.transport.server import die_with_parent

KVRELAY = str(Path(sys.executable).parent / "kvrelay")
READY_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Deployment:
    proc: subprocess.Popen
    url: str
    nats_url: str
    run_dir: Path
    model: str
    namespace: str = "default"
    output: list[str] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)
    lines: queue.Queue[str | None] | None = None

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The next output line (after those already read) matching ``pattern``; fails after ``timeout``."""
        assert self.lines is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no line matching {pattern!r} within {timeout}s:\n" + "".join(self.output[-40:]))
            self.output.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def log(self, name: str) -> str:
        return (self.run_dir / "logs" / f"{name}.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def start_deployment(run_dir: Path, model: str, extra: list[str]) -> Deployment:
    """Start `kvrelay up` and return once it prints that it is up (or fail with its output)."""
    port = free_port()
    env = dict(os.environ, KVRELAY_RUN_DIR=str(run_dir), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [KVRELAY, "up", "--model", model, "--http-port", str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
        preexec_fn=die_with_parent,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    output: list[str] = []
    nats_url = ""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("kvrelay up did not become ready:\n" + "".join(output[-60:]))
        output.append(line)
        m = re.search(r"nats-server on (nats://\S+)", line)
        if m:
            nats_url = m.group(1)
        if "kvrelay is up" in line:
            break
    return Deployment(proc=proc, url=f"http://127.0.0.1:{port}", nats_url=nats_url, run_dir=run_dir,
                      model=model, output=output, lines=lines)


@pytest.fixture(scope="module")
def tiny_deployment(tmp_path_factory) -> Deployment:
    """One prefill + one decode worker on the tiny model, with tight bounds so overload is testable."""
    ports = {"prefill": free_port(), "decode": free_port()}
    dep = start_deployment(
        tmp_path_factory.mktemp("run"), "tiny",
        ["--set", "router.max_inflight=10", "--set", "engine.dtype=\"float32\"",
         "--set", "engine.max_model_len=2048", "--set", "router.chat.compact_json=true",
         # these tests check which path a request takes: the load-blind rule (the adaptive decider would
         # prefill a short prompt on the idle decode worker; tests/router/test_pd_sim.py covers it)
         "--set", 'router.pd_decider="threshold"',
         "--set", f"prefill.metrics_port={ports['prefill']}", "--set", f"decode.metrics_port={ports['decode']}"],
    )
    dep.metrics = {k: f"http://127.0.0.1:{p}/metrics" for k, p in ports.items()}
    yield dep
    code = dep.stop()
    assert code == 0, "kvrelay up did not shut down cleanly:\n" + "".join(dep.output[-40:])


def _plain_vllm(model: str, dtype: str, prompts: list[list[int]], max_tokens: int,
               max_model_len: int = 2048) -> list[dict]:
    """Greedy outputs of one plain vLLM instance (a separate process) for the same prompts."""
    import json

    from kvrelay.models import resolve

    req = {"model": str(resolve(model)), "dtype": dtype, "prompts": prompts, "max_tokens": max_tokens,
           "max_model_len": max_model_len}
    proc = subprocess.run([sys.executable, "-P", str(Path(__file__).with_name("reference.py"))],
                          input=json.dumps(req), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples (matching the given labels) in an exposition text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture
def plain_vllm():
    return _plain_vllm


@pytest.fixture
def metric():
    return _metric


@pytest.fixture(name="start_deployment", scope="session")
def _start_deployment_fixture():
    return start_deployment


@pytest.fixture
def start_up(tmp_path):
    """``start_up(extra_args)`` -> a fresh `kvrelay up` Deployment on the tiny model, stopped at the end."""
    started: list[Deployment] = []

    def start(extra: list[str]) -> Deployment:
        dep = start_deployment(tmp_path / f"run{len(started)}", "tiny", extra)
        started.append(dep)
        return dep

    yield start
    for dep in started:
        dep.stop()
