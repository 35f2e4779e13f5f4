"""Deployments ``bench compare`` starts and stops itself, as real processes on this machine.

- ``Aggregated``: N plain vLLM OpenAI servers (``python -m vllm.entrypoints.openai.api_server``),
  each doing prefill and decode, server i's compute pinned to core i (``VLLM_CPU_OMP_THREADS_BIND``),
  behind the least-outstanding-requests proxy (``loadtest/proxy.py``).
- ``Disaggregated``: ``kvrelay up`` with P prefill and M decode workers (``kvrelay up`` pins
  engine k to core k: prefill first, then decode) and the router policy asked for.

Both get the same engine settings (``EngineSettings``), so the comparison changes one thing: the
architecture. Each ``start()`` returns the base URL once the deployment answers ``/health``;
``stop()`` sends SIGTERM, waits, then SIGKILLs the process group. Logs go to ``log_dir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvrelay.loadtest.cpuwatch import PROC, tree
from kvrelay.up import Child

GIB = 1 << 30
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


class DeploymentError(RuntimeError):
    """A deployment did not come up (the message carries the failing process's log tail)."""


# --- pinning ---------------------------------------------------------------------------------------------
# vLLM 0.32 applies VLLM_CPU_OMP_THREADS_BIND only in its multiprocess executor (OMPProcessManager);
# with VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine's threads stay free to run on every core, and its
# OpenMP pool has one thread per core. Two engines on two cores then oversubscribe them (OpenMP
# barriers with descheduled threads: decode ran at a few tokens/s here). So both deployments get the
# same treatment from outside: OMP_NUM_THREADS=1 in every engine's environment, and once up, every
# thread of each engine's process tree (server/worker process and its EngineCore child) is bound to
# the engine's core with sched_setaffinity.
ENGINE_ENV = {"OMP_NUM_THREADS": "1"}


def pin_tree(root: int, core: int) -> int:
    """Bind every thread of ``root`` and its descendants to ``core``; the number of threads bound."""
    n = 0
    for pid in tree(root):
        try:
            tids = [int(t.name) for t in (PROC / str(pid) / "task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(tid, {core})
                n += 1
    return n


def tree_affinity(root: int) -> list[str]:
    """The distinct CPU lists the threads of ``root``'s tree may run on (the proof of pinning)."""
    seen = set()
    for pid in tree(root):
        with contextlib.suppress(OSError):
            for t in (PROC / str(pid) / "task").iterdir():
                with contextlib.suppress(OSError):
                    seen.add(",".join(str(c) for c in sorted(os.sched_getaffinity(int(t.name)))))
    return sorted(seen)


def find_in_tree(root: int, needle: str) -> int | None:
    """The process under ``root`` whose command line contains ``needle``."""
    for pid in tree(root):
        with contextlib.suppress(OSError):
            cmdline = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
            if needle in cmdline.decode(errors="replace"):
                return pid
    return None


@dataclass(frozen=True)
class EngineSettings:
    """What every engine of either deployment runs with (vLLM names in comments)."""

    model: str = "smollm2"  # kvrelay model name or folder
    # --dtype; "auto" = what kvrelay serves with on this machine (workers/vllm_engine/env.py
    # resolve_dtype: bfloat16 where the CPU has AVX512-BF16 or AMX, else float32), passed to both
    dtype: str = "auto"
    max_model_len: int = 4096  # --max-model-len
    max_num_seqs: int = 16  # --max-num-seqs
    kv_cache_gb: float = 1.0  # --kv-cache-memory-bytes
    block_size: int = 32  # --block-size
    seed: int = 0
    # not set on either side: vLLM's CPU default (2048 tokens per step, chunked prefill on)
    max_num_batched_tokens: str = "vLLM default (2048 on CPU), chunked prefill on"

    @property
    def resolved_dtype(self) -> str:
        from kvrelay.workers.vllm_engine.env import resolve_dtype

        dtype = resolve_dtype(self.dtype)
        return "bfloat16" if dtype == "auto" else dtype  # vLLM's own "auto" on CPU is bfloat16

    def kvrelay_sets(self) -> list[str]:
        sets = [f'engine.dtype="{self.resolved_dtype}"', f"engine.max_model_len={self.max_model_len}",
                f"engine.max_num_seqs={self.max_num_seqs}", f"engine.kv_cache_gb={self.kv_cache_gb}",
                f"cache.block_size={self.block_size}", f"engine.seed={self.seed}",
                # kvrelay's cap on requests a decode worker runs: as many as the engine batches
                f"decode.max_slots={self.max_num_seqs}"]
        return [x for s in sets for x in ("--set", s)]

    def vllm_args(self, folder: str) -> list[str]:
        return ["--model", folder, "--dtype", self.resolved_dtype, "--max-model-len", str(self.max_model_len),
                "--max-num-seqs", str(self.max_num_seqs),
                "--kv-cache-memory-bytes", str(int(self.kv_cache_gb * GIB)),
                "--block-size", str(self.block_size), "--seed", str(self.seed), "--enforce-eager",
                "--enable-prefix-caching"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_healthy(url: str, children: list[Child], timeout_s: float) -> None:
    """Poll ``url`` until 200; DeploymentError if a child exits or the deadline passes."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s:
        while time.monotonic() < deadline:
            for c in children:
                if c.proc is not None and c.proc.returncode is not None:
                    raise DeploymentError(f"{c.name} exited with code {c.proc.returncode} during start-up:\n"
                                          f"{c.tail(30)}")
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            await asyncio.sleep(1.0)  # polling interval of an external process's health endpoint
    raise DeploymentError(f"not healthy at {url} within {timeout_s:.0f}s; logs: "
                          + ", ".join(str(c.log_path) for c in children))


def _resolve(model: str) -> str:
    from kvrelay.models import resolve

    return str(resolve(model))


class Deployment:
    name = "deployment"

    def __init__(self, engine: EngineSettings, log_dir: Path, startup_timeout_s: float = 600.0) -> None:
        self.engine, self.log_dir, self.startup_timeout_s = engine, log_dir, startup_timeout_s
        self.children: list[Child] = []
        self.url = ""
        self.started_s = 0.0
        self.pinned: dict[str, Any] = {}  # engine -> {"core", "threads", "affinity"}

    async def start(self) -> str:
        raise NotImplementedError

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in reversed(self.children)))
        for c in self.children:  # whatever a stopped process left behind in its group (engine cores)
            if c.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)

    def describe(self) -> dict[str, Any]:
        return {"engine": asdict(self.engine) | {"dtype_used": self.engine.resolved_dtype},
                "startup_s": round(self.started_s, 1),
                "pinned": self.pinned, "engine_env": ENGINE_ENV}

    def _pin(self, name: str, pid: int | None, core: int) -> None:
        if pid is None:
            self.pinned[name] = {"core": core, "error": "process not found"}
            return
        self.pinned[name] = {"core": core, "threads": pin_tree(pid, core), "affinity": tree_affinity(pid)}

    async def _launch(self, pairs: list[tuple[Child, dict[str, str]]], health: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self.children = [c for c, _ in pairs]
        try:
            for c, env in pairs:
                await c.start(env)
            await wait_healthy(health, self.children, self.startup_timeout_s)
        except BaseException:
            await self.stop()
            raise
        self.started_s = time.monotonic() - t0


class Aggregated(Deployment):
    name = "aggregated"

    def __init__(self, engine: EngineSettings, log_dir: Path, instances: int = 2, **kw: Any) -> None:
        super().__init__(engine, log_dir, **kw)
        self.instances = instances
        self.cores = [str(i % max(1, os.cpu_count() or 1)) for i in range(instances)]

    async def start(self) -> str:
        folder = _resolve(self.engine.model)
        port = free_port()
        pairs: list[tuple[Child, dict[str, str]]] = []
        proxy = [sys.executable, "-m", "kvrelay.loadtest.proxy", "--port", str(port)]
        for i, core in enumerate(self.cores):
            p = free_port()
            proxy += ["--backend", f"http://127.0.0.1:{p}"]
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                    *self.engine.vllm_args(folder), "--host", "127.0.0.1", "--port", str(p),
                    "--uvicorn-log-level", "warning"]
            # each server's own environment pins its engine to its core
            env = dict(os.environ, **VLLM_ENV, **ENGINE_ENV, VLLM_CPU_OMP_THREADS_BIND=core)
            pairs.append((Child(f"vllm-{i}", argv, self.log_dir / f"vllm-{i}.log"), env))
        pairs.append((Child("proxy", proxy, self.log_dir / "proxy.log"), dict(os.environ)))
        self.url = f"http://127.0.0.1:{port}"
        await self._launch(pairs, self.url + "/health")
        for (child, _), core in zip(pairs, self.cores):
            self._pin(child.name, child.proc.pid if child.proc else None, int(core))
        return self.url

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "what": f"{self.instances} plain vLLM OpenAI servers (prefill + decode each) behind a "
                    f"least-outstanding-requests HTTP proxy",
            "engine_cores": {f"vllm-{i}": c for i, c in enumerate(self.cores)},
            "pinning": "every thread of server i (API frontend + EngineCore) bound to core i "
                       "(sched_setaffinity, see 'pinned'); OMP_NUM_THREADS=1; the proxy is not pinned",
            "router": "least outstanding requests (loadtest/proxy.py), no KV awareness"}


class Disaggregated(Deployment):
    name = "disaggregated"

    def __init__(self, engine: EngineSettings, log_dir: Path, prefill: int = 1, decode: int = 1,
                 policy: str = "kv_aware", export_mb: int = 2048, sets: tuple[str, ...] = (),
                 load_on_prefill_cores: bool = True, **kw: Any) -> None:
        super().__init__(engine, log_dir, **kw)
        self.prefill, self.decode, self.policy, self.export_mb = prefill, decode, policy, export_mb
        from kvrelay.up import core_plan

        self.cores = core_plan(prefill, decode, os.cpu_count() or 1)
        # the decode workers' KV loader threads on the prefill cores (decode.kv_load_cpus): the CPU
        # stand-in for a GPU's copy engine, so an import never stretches a decode step
        self.load_cpus = ",".join(sorted(set(self.cores[:prefill]))) if load_on_prefill_cores else ""
        loads = (f'decode.kv_load_cpus="{self.load_cpus}"',) if self.load_cpus else ()
        # more ``--set key=value`` for kvrelay up (after the ones above: they win)
        self.sets = (*loads, *sets)
        self.policy_seen = ""

    async def start(self) -> str:
        port = free_port()
        argv = [sys.executable, "-m", "kvrelay.cli", "up", "--model", self.engine.model,
                "--prefill", str(self.prefill), "--decode", str(self.decode), "--http-port", str(port),
                *self.engine.kvrelay_sets(), "--set", f'router.policy="{self.policy}"',
                "--set", f"prefill.export_mb={self.export_mb}",
                "--set", f"engine.startup_timeout_s={self.startup_timeout_s}",
                *[x for kv in self.sets for x in ("--set", kv)]]
        run_dir = self.log_dir / "run"
        env = dict(os.environ, **ENGINE_ENV, KVRELAY_RUN_DIR=str(run_dir), KVRELAY_LOG_FORMAT="json")
        self.url = f"http://127.0.0.1:{port}"
        await self._launch([(Child("kvrelay-up", argv, self.log_dir / "up.log"), env)], self.url + "/health")
        self.policy_seen = self._policy_from_log(run_dir / "logs" / "router.log")
        up = self.children[0].proc
        roles = [f"prefill-{i}" for i in range(self.prefill)] + [f"decode-{i}" for i in range(self.decode)]
        for role, core in zip(roles, self.cores):
            self._pin(role, find_in_tree(up.pid, f"--id {role}") if up else None, int(core))
        return self.url

    @staticmethod
    def _policy_from_log(path: Path) -> str:
        """The policy the router says it runs (its ``router_listening`` log line)."""
        import json

        try:
            for line in path.read_text(errors="replace").splitlines():
                if "router_listening" in line:
                    try:
                        return str(json.loads(line).get("policy", ""))
                    except ValueError:
                        return "unknown (log line not JSON)"
        except OSError:
            pass
        return "unknown (no router log)"

    def describe(self) -> dict[str, Any]:
        roles = [f"prefill-{i}" for i in range(self.prefill)] + [f"decode-{i}" for i in range(self.decode)]
        return super().describe() | {
            "what": f"kvrelay up: {self.prefill} prefill + {self.decode} decode workers, router, nats-server",
            "engine_cores": dict(zip(roles, self.cores)),
            "pinning": "every thread of each worker (service + EngineCore) bound to its core "
                       "(sched_setaffinity, see 'pinned'); OMP_NUM_THREADS=1; router and nats-server "
                       "are not pinned; the decode workers' KV loader threads start after that and bind "
                       f"themselves to {self.load_cpus or 'nothing'} (decode.kv_load_cpus)",
            "router": f"kvrelay router, policy asked {self.policy!r}, policy reported {self.policy_seen!r}",
            "kvrelay_settings": {"prefill.export_mb": self.export_mb,
                                 "decode.max_slots": self.engine.max_num_seqs, "sets": list(self.sets),
                                 "other": "kvrelay defaults (workers/config.py, router/config.py)"}}
