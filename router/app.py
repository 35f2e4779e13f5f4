"""The router process: bus, discovery, dispatcher, NATS intake and HTTP API, wired together.

``serve(cfg, stop)`` runs until ``stop`` is set (or a background task fails), then stops
accepting, cancels and awaits every task it owns, and closes the bus. ``Router`` is the same
thing as an object, for tests and for ``kvrelay up``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from kvrelay.base.ids import component_id
from kvrelay.base.logs import get_logger
from kvrelay.base.tasks import cancel_and_wait
from kvrelay.router.config import RouterProcessConfig
from kvrelay.router.dispatcher import Dispatcher, Hasher
from kvrelay.router.chat_parsing import ChatFeatures
from kvrelay.router.chat_templates import ChatTemplateError
from kvrelay.router.http import HttpApi
from kvrelay.router.tenants import Tenants
from kvrelay.schemas.tenants import TenantsError
from kvrelay.router.intake import Intake
from kvrelay.router.metrics import RouterMetrics
from kvrelay.router.policy import Policy
from kvrelay.router.policy_factory import kv_routing, make_policy
from kvrelay.router.tokenizer import RouterTokenizer
from kvrelay.router.watch import FlightWatch
from kvrelay.transport.bus import Bus
from kvrelay.transport.discovery import Directory

log = get_logger(__name__)


class RouterStartError(RuntimeError):
    """The router cannot start: no model configured, or its tokenizer cannot be loaded."""


def router_id(configured: str) -> str:
    return configured or component_id("router")


def _model_folder(model: str) -> Path:
    if not model:
        raise RouterStartError("router.model is not set: give --model (smollm2, tiny or a model folder)")
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise RouterStartError(f"router.model {model!r} is not a model folder (no config.json)")
    return folder


class Router:
    """One router. ``await start()`` (returns when the HTTP port is bound), ``await stop()``.

    ``tokenizer``, ``policy`` and ``hasher`` may be given (tests share one tokenizer; the
    KV-aware wiring passes its policy and block hasher); otherwise they come from the config.
    The router does not own a tokenizer it was given.
    """

    def __init__(self, cfg: RouterProcessConfig, tokenizer: RouterTokenizer | None = None, policy: Policy | None = None,
                 hasher: Hasher | None = None) -> None:
        self.cfg = cfg
        self.id = router_id(cfg.router.router_id)
        self.metrics = RouterMetrics()
        self.tokenizer = tokenizer
        self._own_tokenizer = tokenizer is None
        self.index = None  # the prefix index of the kv_aware policy, fed by KV events
        if policy is None and cfg.router.policy == "kv_aware":
            policy, hasher, self.index = kv_routing(cfg.router, cfg.cache)
        self.policy = policy or make_policy(cfg.router.policy)
        self.hasher = hasher
        self.kv_events = None
        self.shared_inflight = None
        self.bus: Bus | None = None
        self.directory: Directory | None = None
        self.dispatcher: Dispatcher | None = None
        self.intake: Intake | None = None
        self.http: HttpApi | None = None
        self.model_name = ""
        self.url = ""
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> str:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self.url

    async def _start(self) -> None:
        rc = self.cfg.router
        if self.tokenizer is None:
            self.tokenizer = await RouterTokenizer.load(_model_folder(rc.model))
        if not self.model_name:
            self.model_name = rc.served_model_name or Path(self.tokenizer.folder).absolute().name
        self.bus = await Bus.connect(self.cfg.bus, self.id)
        if self.index is not None:
            from kvrelay.router.index_feed import KvEventsSubscriber, KvIndexCollector

            self.kv_events = KvEventsSubscriber(self.bus, self.index, self.id, rc.kv_snapshot_timeout_s)
            await self.kv_events.start()
            self.metrics.registry.register(KvIndexCollector(self.index, self.kv_events))
        self.directory = Directory(self.bus)
        self.tasks.append(asyncio.create_task(self.directory.run(), name="directory"))
        if self.kv_events is not None:
            from kvrelay.router.membership import IndexMembership, MembershipCollector

            membership = IndexMembership(self.directory, self.kv_events, self.cfg.bus.heartbeat_s)
            self.metrics.registry.register(MembershipCollector(membership))
            self.tasks.append(asyncio.create_task(membership.run(), name="kv-membership"))
        try:
            self.tenants = Tenants(rc.tenants_file)
        except TenantsError as exc:
            raise RouterStartError(str(exc)) from exc
        self.dispatcher = Dispatcher(self.bus, self.directory, self.policy, rc, self.metrics, self.id,
                                     self.hasher, self.tenants)
        await self.dispatcher.start()
        self.directory.listeners.append(self.dispatcher.admission.on_worker)
        watch = FlightWatch(self.dispatcher, rc.watch_interval_s, rc.stream_stall_timeout_s)
        self.tasks.append(asyncio.create_task(watch.run(), name="flight-watch"))
        if rc.share_inflight:
            from kvrelay.router.shared_inflight import SharedInflight

            self.shared_inflight = SharedInflight(self.bus, self.dispatcher.table, self.id,
                                                  rc.request_timeout_s)
            await self.shared_inflight.start()
        if self.tenants.enabled:
            self.tasks.append(asyncio.create_task(self.tenants.watch(), name="tenants-watch"))
        elif rc.http_host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("open_server_on_network", http_host=rc.http_host,
                        warning="no router.tenants_file: anyone who reaches this address can use it; "
                                "configure tenants (README: Tenants and security)")
        try:
            self.chat = ChatFeatures(rc.chat, self.tokenizer.hf)
        except ChatTemplateError as exc:
            raise RouterStartError(str(exc)) from exc
        self.chat.preload()
        if rc.intake_enabled:
            self.intake = Intake(self.bus, self.dispatcher, self.tokenizer, rc, self.metrics, self.model_name,
                                 self.chat, self.tenants)
            self.tasks.append(asyncio.create_task(self.intake.run(), name="intake"))
        self.http = HttpApi(rc, self.dispatcher, self.tokenizer, self.directory, self.metrics, self.model_name,
                            self.chat, self.tenants)
        self.url = await self.http.start()

    async def stop(self) -> None:
        """Stop accepting, cancel and await every task, close the bus. Safe to call twice."""
        if self.http is not None:
            await self.http.stop()
            self.http = None
        await cancel_and_wait(self.tasks)
        self.tasks.clear()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
            self.dispatcher = None
        if self.shared_inflight is not None:
            await self.shared_inflight.close()
            self.shared_inflight = None
        if self.kv_events is not None:
            await self.kv_events.close()
            self.kv_events = None
        if self.bus is not None:
            await self.bus.close()
            self.bus = None
        if self.tokenizer is not None and self._own_tokenizer:
            self.tokenizer.close()

    async def wait(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; raises if a background task ended on its own (it failed)."""
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([stopper, *self.tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopper
        for task in done:
            if task is not stopper:
                exc = None if task.cancelled() else task.exception()
                raise RuntimeError(f"router task {task.get_name()} ended: {exc!r}") from exc


async def serve(cfg: RouterProcessConfig, stop: asyncio.Event) -> None:
    """Run a router until ``stop`` is set."""
    router = Router(cfg)
    await router.start()
    log.info("router_listening", url=router.url, model=router.model_name, router_id=router.id,
             policy=cfg.router.policy)
    try:
        await router.wait(stop)
    finally:
        await router.stop()
        log.info("router_stopped", router_id=router.id)
