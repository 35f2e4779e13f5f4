"""The ``kvrelay`` command: ``up`` (everything on one machine) or one component at a time.

    kvrelay up [--model smollm2|tiny|PATH] [--prefill N] [--decode M] [--http-port P] [--nats-url URL]
    kvrelay nats | router | prefill | decode      one component, against --nats-url
    kvrelay model prepare smollm2|tiny           convert / build a model folder once (cached)
    kvrelay tenants add NAME --file F | nats-config   tenants' secrets; a nats-server config for them
    kvrelay bench ...                              benchmarks (see README)
"""

from __future__ import annotations

import argparse
from pathlib import Path
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from kvrelay.base import envs
from kvrelay.config import Config, ConfigError, load
from kvrelay.models import ModelError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=envs.config_file(), help="JSON or TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set router.max_inflight=64")
    p.add_argument("--nats-url", default=envs.nats_url(), help="NATS server URL (default: config)")
    p.add_argument("--namespace", default=envs.namespace(), help="subject namespace (default: 'default')")
    p.add_argument("--model", default=None, help="smollm2, tiny, or a model folder")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvrelay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="nats-server + router + prefill and decode workers, on this machine")
    _common(up)
    up.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    up.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    up.add_argument("--http-port", type=int, default=8000)
    up.add_argument("--http-host", default="127.0.0.1")
    up.add_argument("--nats-port", type=int, default=0, help="embedded nats-server port (0 = free port)")
    up.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    up.add_argument("--tenants", default=None, help="tenants file: API keys, NATS users, quotas (router.tenants_file)")

    nats = sub.add_parser("nats", help="run an embedded nats-server with JetStream")
    nats.add_argument("--port", type=int, default=4222)
    nats.add_argument("--host", default="127.0.0.1")
    nats.add_argument("--store-dir", default=None)

    for name, helptext in (("router", "the router with the OpenAI-compatible HTTP API and the NATS intake"),
                           ("prefill", "a prefill worker"), ("decode", "a decode worker")):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        p.add_argument("--id", dest="worker_id", default=None, help="component id (default: host-pid)")
        if name == "router":
            p.add_argument("--http-port", type=int, default=None)
            p.add_argument("--http-host", default=None)
        else:
            p.add_argument("--engine", choices=["vllm", "sim"], default=None)

    model = sub.add_parser("model", help="prepare models")
    msub = model.add_subparsers(dest="model_command", required=True)
    prep = msub.add_parser("prepare", help="build the model folder(s) once; cached")
    prep.add_argument("names", nargs="+", help="smollm2 and/or tiny")
    path = msub.add_parser("path", help="print a prepared model's folder")
    path.add_argument("name")

    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    from kvrelay.tenants_cli import add_parsers

    add_parsers(sub)
    return ap


def config_from_args(args: argparse.Namespace) -> Config:
    """The root config: file, then flags, then --set overrides; model names resolved to folders."""
    values: dict[str, Any] = {}
    if getattr(args, "nats_url", None):
        values.setdefault("bus", {})["url"] = args.nats_url
    if getattr(args, "namespace", None):
        values.setdefault("bus", {})["namespace"] = args.namespace
    if getattr(args, "model", None):
        values.setdefault("engine", {})["model"] = args.model
        values.setdefault("router", {})["model"] = args.model
    if getattr(args, "http_port", None) is not None:
        values.setdefault("router", {})["http_port"] = args.http_port
    if getattr(args, "http_host", None):
        values.setdefault("router", {})["http_host"] = args.http_host
    if getattr(args, "tenants", None):
        values.setdefault("router", {})["tenants_file"] = str(Path(args.tenants).absolute())
    if getattr(args, "engine", None):
        values.setdefault("engine", {})["kind"] = args.engine
    wid = getattr(args, "worker_id", None)
    if wid:
        section = {"router": "router", "prefill": "prefill", "decode": "decode"}[args.command]
        key = "router_id" if section == "router" else "worker_id"
        values.setdefault(section, {})[key] = wid
    return with_model_folders(load(args.config, args.overrides, values))


def with_model_folders(cfg: Config) -> Config:
    """Model names (``smollm2``, ``tiny``) in ``router.model`` and ``engine.model`` resolved to their
    prepared folders, the router's served name and its "auto" chat settings (tool parser, chat
    template) filled in: the components take folders only."""
    from kvrelay.models import chat_defaults, resolve, served_name

    router, engine = cfg.router, cfg.engine
    parser, template = chat_defaults(router.model)
    chat = router.chat
    if chat.tool_call_parser == "auto":
        chat = chat.replace(tool_call_parser=parser)
    if chat.chat_template == "auto":
        chat = chat.replace(chat_template=template)
    router = router.replace(chat=chat)
    if router.model:
        router = router.replace(model=str(resolve(router.model)))
        router = router.replace(served_model_name=router.served_model_name or served_name(router.model))
    if engine.model:
        engine = engine.replace(model=str(resolve(engine.model)))
    return cfg.replace(router=router, engine=engine)


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` on uvloop; SIGINT/SIGTERM set ``stop`` so it shuts down cleanly."""
    import uvloop

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    uvloop.run(wrapper())


def _component(args: argparse.Namespace) -> None:
    from kvrelay.base.logs import setup

    cfg = config_from_args(args)
    setup(args.command, envs.log_level(), envs.log_format())
    if args.command != "router" and cfg.engine.cpu_bind:
        # read by vLLM's CPU worker in the engine process this one spawns
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.engine.cpu_bind
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if args.command == "router":
        from kvrelay.router.app import serve
    elif args.command == "prefill":
        from kvrelay.workers.prefill import serve
    else:
        from kvrelay.workers.decode import serve
    part = cfg.router_process() if args.command == "router" else cfg.worker_process()
    run_until_signal(lambda stop: serve(part, stop))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            from kvrelay.up import up

            return up(args)
        if args.command == "nats":
            from kvrelay.transport.server import main as nats_main

            return nats_main(host=args.host, port=args.port, store_dir=args.store_dir)
        if args.command == "model":
            from kvrelay.base.logs import setup
            from kvrelay.models import prepare, resolve

            setup("model", envs.log_level(), envs.log_format())  # logs to stderr: stdout is the folder
            if args.model_command == "prepare":
                for name in args.names:
                    print(prepare(name))
            else:
                print(resolve(args.name))
            return 0
        if args.command in ("tenants", "nats-config"):
            from kvrelay.tenants_cli import main as tenants_main

            return tenants_main(args)
        if args.command == "bench":
            from kvrelay.loadtest.cli import main as bench_main

            return bench_main(args.bench_args)
        _component(args)
        return 0
    except ConfigError as exc:
        print(f"kvrelay: config error: {exc}", file=sys.stderr)
        return 2
    except ModelError as exc:
        print(f"kvrelay: model error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
