"""``kvrelay up``: the whole deployment on one machine, as real processes.

An embedded nats-server (unless --nats-url), one router (OpenAI-compatible HTTP API + NATS
intake), N prefill and M decode workers, each its own process with its log in the run folder.
Ready when the router's /health says a prefill and a decode worker are live. A child that dies
is restarted with back-off, a bounded number of times per window (``kvrelay.supervisor``); the
others keep serving meanwhile. Ctrl-C (or SIGTERM) stops the children in order: SIGTERM, a grace
period, then SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvrelay.base import envs
from kvrelay.base.tasks import cancel_and_wait
from kvrelay.config import Config
from kvrelay.supervisor import RestartPolicy, SuperviseConfig
from kvrelay.router.tenants import RELOAD_S, Tenants
from kvrelay.schemas.tenants import TenantsError, load_tenants
from kvrelay.transport.auth import authorization, make_service_secrets
from kvrelay.transport.auth import render as render_authorization
from kvrelay.transport.server import NatsServer, die_with_parent
from kvrelay.transport.subjects import Subjects

GRACE_S = 20.0


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    log_file: object = field(default=None, repr=False)

    async def start(self, env: dict[str, str]) -> None:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=self.log_file, stderr=self.log_file,
            env=env, start_new_session=True, preexec_fn=die_with_parent,
        )

    async def restart(self, env: dict[str, str], delay_s: float) -> None:
        """Start again after ``delay_s`` (the log file is appended to)."""
        await asyncio.sleep(delay_s)
        self._close_log()
        await self.start(env)

    def _close_log(self) -> None:
        if self.log_file is not None:
            self.log_file.close()  # type: ignore[attr-defined]
            self.log_file = None

    async def stop(self, grace: float = GRACE_S) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        self._close_log()

    def tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def core_plan(n_prefill: int, n_decode: int, n_cores: int) -> list[str]:
    """One core per engine, round robin over the machine's cores (prefill first, then decode).

    On a 2-core laptop with one of each, prefill computes on core 0 and decode on core 1, so a
    long prompt never stalls decode steps: the point of disaggregation.
    """
    return [str(i % max(1, n_cores)) for i in range(n_prefill + n_decode)]


def _identity(role: str, secrets_dir: Path | None) -> list[str]:
    """A child's NATS service identity (a secured embedded server): its user and password file."""
    if secrets_dir is None:
        return []
    return ["--set", f"bus.user=\"{role}\"", "--set", f"bus.password_file=\"{secrets_dir / (role + '.password')}\""]


def _children(cfg_path: Path, args: argparse.Namespace, log_dir: Path, cfg: Config,
              secrets_dir: Path | None = None) -> list[Child]:
    base = [sys.executable, "-P", "-m", "kvrelay.cli"]  # -P: never import from the working directory
    out = [Child("router", base + ["router", "--config", str(cfg_path), "--id", "router-0",
                                   *_identity("router", secrets_dir)], log_dir / "router.log")]
    roles = [("prefill", i) for i in range(args.prefill)] + [("decode", i) for i in range(args.decode)]
    cores = core_plan(args.prefill, args.decode, os.cpu_count() or 1)
    for (role, i), core in zip(roles, cores):
        argv = base + [role, "--config", str(cfg_path), "--id", f"{role}-{i}", *_identity(role, secrets_dir)]
        if not cfg.engine.cpu_bind:
            argv += ["--set", f"engine.cpu_bind=\"{core}\""]
        out.append(Child(f"{role}-{i}", argv, log_dir / f"{role}-{i}.log"))
    return out


async def _healthy(url: str, timeout: float = 2.0) -> bool:
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url) as r:
                return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


async def _wait_ready(children: list[Child], health_url: str, stop: asyncio.Event, timeout: float) -> str | None:
    """None when ready; else why not (a child exited, the deadline passed, or we were stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in children:
            if c.proc is not None and c.proc.returncode is not None:
                return f"{c.name} exited with code {c.proc.returncode} during start-up:\n{c.tail()}"
        if stop.is_set():
            return "stopped"
        if await _healthy(health_url):
            return None
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
    return f"not ready within {timeout:.0f}s (see the logs)"


def _banner(cfg: Config, nats_url: str, log_dir: Path, started: float) -> str:
    host, port = cfg.router.http_host, cfg.router.http_port
    base = f"http://{host}:{port}"
    from kvrelay.models import served_name

    model = cfg.router.served_model_name or served_name(cfg.router.model)  # the name the router serves
    sample = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                         "max_tokens": 32})
    return (
        f"\nkvrelay is up in {time.monotonic() - started:.1f}s\n"
        f"  OpenAI-compatible API  {base}/v1   (health {base}/health, metrics {base}/metrics)\n"
        f"  NATS                   {nats_url}  (namespace {cfg.bus.namespace!r}, subjects kvrelay.{cfg.bus.namespace}.*)\n"
        f"  model                  {model}  ({cfg.engine.model})\n"
        f"  logs                   {log_dir}/\n\n"
        f"try:\n  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f"    -d '{sample}'\n\nCtrl-C stops everything.\n"
    )


async def _supervise(children: list[Child], stop: asyncio.Event, env: dict[str, str],
                     cfg: SuperviseConfig) -> int:
    """Until Ctrl-C (exit code 0), restarting children that die (``kvrelay.supervisor``); a child
    that exhausts its restarts stops the deployment (exit code 1). The others serve meanwhile."""
    policies = {c.name: RestartPolicy(cfg) for c in children}
    tasks: dict[asyncio.Future, tuple[str, Child]] = {
        asyncio.ensure_future(c.proc.wait()): ("exit", c) for c in children if c.proc is not None}
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                return 0
            for fut in done:
                kind, c = tasks.pop(fut)
                if kind == "restart":
                    fut.result()  # a failed start is an error of kvrelay up itself
                    print(f"kvrelay: {c.name} restarted (pid {c.proc.pid})", flush=True)
                    tasks[asyncio.ensure_future(c.proc.wait())] = ("exit", c)
                    continue
                decision = policies[c.name].on_exit(time.monotonic())
                code = c.proc.returncode
                if not decision.restart:
                    print(f"kvrelay: {c.name} exited unexpectedly (code {code}) and used up its restarts "
                          f"({cfg.max_restarts} in {cfg.window_s:.0f}s): stopping\n{c.tail()}",
                          file=sys.stderr, flush=True)
                    return 1
                print(f"kvrelay: {c.name} exited unexpectedly (code {code}); restart "
                      f"{policies[c.name].total} in {decision.delay_s:.1f}s "
                      f"({decision.restarts_in_window}/{cfg.max_restarts} in the window)\n{c.tail(10)}",
                      file=sys.stderr, flush=True)
                tasks[asyncio.ensure_future(c.restart(env, decision.delay_s))] = ("restart", c)
    finally:
        await cancel_and_wait([stopper, *tasks])


async def _up(cfg: Config, args: argparse.Namespace, stop: asyncio.Event) -> int:
    started = time.monotonic()
    run_dir = envs.run_dir()
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = None
    nats_url = cfg.bus.url if args.nats_url else ""
    auth = BusAuth(cfg, run_dir) if cfg.router.tenants_file and not nats_url else None
    if not nats_url:
        server = NatsServer(port=args.nats_port, authorization=auth.render() if auth else "")
        nats_url = server.start()  # main thread: the child's death signal follows this thread
        print(f"kvrelay: nats-server on {nats_url}" + (" (tenants: authorization on)" if auth else ""), flush=True)
    cfg = cfg.replace(bus=cfg.bus.replace(url=nats_url))
    cfg_path = run_dir / "up-config.json"
    cfg_path.write_text(json.dumps(cfg.to_mapping(), indent=2))
    children = _children(cfg_path, args, log_dir, cfg, auth.secrets_dir if auth else None)
    watch = asyncio.create_task(auth.watch(server)) if auth and server else None
    env = dict(os.environ, KVRELAY_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    try:
        for c in children:
            await c.start(env)
        print(f"kvrelay: started {', '.join(f'{c.name} (pid {c.proc.pid})' for c in children)}; waiting for the workers "
              f"(loading the model takes a while; logs in {log_dir})", flush=True)
        health = f"http://{cfg.router.http_host}:{cfg.router.http_port}/health"
        why = await _wait_ready(children, health, stop, cfg.engine.startup_timeout_s)
        if why == "stopped":
            return 0
        if why is not None:
            print(f"kvrelay: {why}", file=sys.stderr)
            return 1
        print(_banner(cfg, nats_url, log_dir, started), flush=True)
        return await _supervise(children, stop, env, cfg.supervise)
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        print("kvrelay: stopping...", flush=True)
        # router first (stops intake), then workers, in parallel within each group
        await asyncio.gather(*(c.stop() for c in children if c.name == "router"))
        await asyncio.gather(*(c.stop() for c in children if c.name != "router"))
        if server is not None:
            server.stop()
        print("kvrelay: stopped", flush=True)


class BusAuth:
    """The embedded nats-server's authorization from the tenants file: service identities (passwords
    in ``<run>/secrets``, mode 0600) and a user per tenant; re-generated when the file changes."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.subjects = Subjects(cfg.bus.namespace)
        self.file = Tenants(cfg.router.tenants_file)  # the router's reader: same file, same reload rule
        self.secrets_dir = run_dir / "secrets"
        self.services = make_service_secrets(self.secrets_dir)

    def render(self) -> str:
        assert self.file.config is not None
        return render_authorization(authorization(self.file.config, self.subjects, self.services))

    async def watch(self, server: NatsServer) -> None:
        """Reload the server's users when the tenants file changes (an invalid file is logged, the
        last good one kept)."""
        while True:
            await asyncio.sleep(RELOAD_S)
            if await asyncio.to_thread(self.file.reload):
                server.reload(self.render())
                print(f"kvrelay: tenants reloaded ({len(self.file.config.tenants)})", flush=True)


def up(args: argparse.Namespace) -> int:
    from kvrelay.cli import config_from_args, run_until_signal

    if args.model is None:
        args.model = "smollm2"
    if args.prefill < 1 or args.decode < 1:
        print("kvrelay: --prefill and --decode must be at least 1", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    if cfg.router.tenants_file:
        try:
            load_tenants(cfg.router.tenants_file)
        except TenantsError as exc:
            print(f"kvrelay: {exc}", file=sys.stderr)
            return 2
    result: list[int] = []

    async def main(stop: asyncio.Event) -> None:
        result.append(await _up(cfg, args, stop))

    run_until_signal(main)
    return result[0] if result else 1
