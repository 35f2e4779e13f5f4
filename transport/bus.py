"""The bus: one NATS connection + JetStream context per component, and kvrelay's streams.

``Bus`` owns the connection: components publish, request and subscribe through it, consume
streams through it (``pull_consumer`` from ``transport.jetstream``, ``subscribe_stream``), and
open key-value buckets with it; nothing else touches the nats-py client or its JetStream context.
Every operation here has a timeout and translates nats-py errors into ``transport.errors``:
no responders / connection refused -> ``BusUnavailable``; timeouts -> ``BusTimeout``; a full
stream (``discard=new`` at its bound) -> ``Backpressure``. Messages are ``schemas`` structs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from kvrelay.base.logs import get_logger
from kvrelay.schemas.codec import Message, unpack, pack
from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.transport.errors import Backpressure, BusTimeout, BusUnavailable, TransportError
from kvrelay.transport.jetstream import ConsumerSpec, PullConsumer
from kvrelay.transport.subjects import Subjects

log = get_logger(__name__)

M = TypeVar("M", bound=Message)

_FULL_MARKERS = ("maximum messages", "maximum bytes", "resource limits exceeded", "insufficient resources")


def is_full_error(exc: BaseException) -> bool:
    """A JetStream API error that means 'the stream is at its bound' (discard=new)."""
    text = str(getattr(exc, "description", "") or exc).lower()
    return any(m in text for m in _FULL_MARKERS)


def stream_config(name: str, subjects: list[str], limits: StreamLimits, work_queue: bool) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=subjects,
        retention=RetentionPolicy.WORK_QUEUE if work_queue else RetentionPolicy.LIMITS,
        max_msgs=limits.max_msgs,
        max_bytes=limits.max_bytes,
        max_age=limits.max_age_s,
        max_msg_size=limits.max_msg_size,
        discard=DiscardPolicy.NEW if limits.discard == "new" else DiscardPolicy.OLD,
        storage=StorageType.FILE if limits.storage == "file" else StorageType.MEMORY,
        num_replicas=limits.replicas,
    )


class Bus:
    """A component's connection to NATS. Create with ``await Bus.connect(cfg, name)``; ``close()``."""

    def __init__(self, cfg: BusConfig, nc: NatsClient) -> None:
        self.cfg = cfg
        self.nc = nc
        self.js = nc.jetstream(timeout=cfg.request_timeout_s)
        self.subjects = Subjects(cfg.namespace)

    @classmethod
    async def connect(cls, cfg: BusConfig, name: str) -> Bus:
        async def on_error(exc: Exception) -> None:
            log.warning("nats_error", error=repr(exc))

        nc = NatsClient()
        auth = {}
        if cfg.user:
            auth = {"user": cfg.user, "password": _read_secret(cfg.password_file)}
        try:
            # the initial connect is bounded: nats-py would otherwise retry it forever
            await asyncio.wait_for(nc.connect(
                servers=[cfg.url],
                name=name,
                connect_timeout=cfg.connect_timeout_s,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                pending_size=64 << 20,
                **auth,
            ), timeout=cfg.connect_timeout_s * 2)
        except (OSError, nats.errors.Error, asyncio.TimeoutError) as exc:
            if not nc.is_closed:
                await nc.close()
            raise BusUnavailable(f"cannot connect to NATS at {cfg.url}: {exc!r}") from exc
        return cls(cfg, nc)

    async def close(self, timeout: float = 5.0) -> None:
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), timeout)
        except (asyncio.TimeoutError, nats.errors.Error):
            await self.nc.close()

    # --- streams ----------------------------------------------------------------------------------
    async def ensure_stream(self, config: StreamConfig) -> None:
        """Create the stream, or update it to ``config`` if it exists (bounds always applied)."""
        try:
            try:
                await self.js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(config)
                return
            await self.js.update_stream(config)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise BusUnavailable(f"cannot set up stream {config.name}: {exc!r}") from exc

    async def ensure_request_stream(self) -> None:
        s = self.subjects
        await self.ensure_stream(stream_config(s.stream_requests, [s.request_all], self.cfg.requests, True))

    async def ensure_prefilled_stream(self) -> None:
        s = self.subjects
        subjects = [s.prefilled, f"{s.prefilled}.*"]
        await self.ensure_stream(stream_config(s.stream_prefilled, subjects, self.cfg.prefilled, True))

    async def ensure_kv_events_stream(self) -> None:
        s = self.subjects
        await self.ensure_stream(stream_config(s.stream_kv_events, [s.kv_events_all], self.cfg.kv_events, False))

    # --- messages ---------------------------------------------------------------------------------
    async def publish(self, subject: str, msg: Message | bytes, headers: dict[str, str] | None = None) -> None:
        data = msg if isinstance(msg, bytes) else pack(msg)
        try:
            await self.nc.publish(subject, data, headers=headers)
        except nats.errors.Error as exc:
            raise BusUnavailable(f"publish to {subject} failed: {exc!r}") from exc

    async def js_publish(self, subject: str, msg: Message | bytes, timeout: float | None = None,
                         msg_id: str | None = None) -> int:
        """Publish to a stream and wait for its ack; returns the stream sequence."""
        data = msg if isinstance(msg, bytes) else pack(msg)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        try:
            ack = await self.js.publish(subject, data, timeout=timeout or self.cfg.request_timeout_s,
                                        headers=headers)
        except nats.js.errors.APIError as exc:
            if is_full_error(exc):
                raise Backpressure(f"stream for {subject} is full: {exc.description}") from exc
            raise TransportError(f"publish to {subject} rejected: {exc!r}") from exc
        except nats.errors.NoRespondersError as exc:
            raise BusUnavailable(f"no stream listens on {subject}") from exc
        except (nats.errors.TimeoutError, asyncio.TimeoutError) as exc:
            raise BusTimeout(f"publish to {subject} not acknowledged in time") from exc
        except nats.errors.Error as exc:
            raise BusUnavailable(f"publish to {subject} failed: {exc!r}") from exc
        return ack.seq

    async def request(self, subject: str, msg: Message, reply_type: type[M], timeout: float | None = None) -> M:
        """Core request/reply with a decoded, validated reply."""
        try:
            reply = await self.nc.request(subject, pack(msg), timeout=timeout or self.cfg.request_timeout_s)
        except nats.errors.NoRespondersError as exc:
            raise BusUnavailable(f"no one listens on {subject}") from exc
        except (nats.errors.TimeoutError, asyncio.TimeoutError) as exc:
            raise BusTimeout(f"no reply on {subject} in time") from exc
        except nats.errors.Error as exc:
            raise BusUnavailable(f"request on {subject} failed: {exc!r}") from exc
        return unpack(reply.data, reply_type)

    async def subscribe(self, subject: str, cb: Callable[[Msg], Awaitable[None]],
                        queue: str = "") -> Subscription:
        """A subscription bounded by the config's pending limits (excess is dropped and reported)."""
        try:
            return await self.nc.subscribe(
                subject, queue=queue, cb=cb,
                pending_msgs_limit=self.cfg.pending_msgs_limit,
                pending_bytes_limit=self.cfg.pending_bytes_limit,
            )
        except nats.errors.Error as exc:
            raise BusUnavailable(f"subscribe to {subject} failed: {exc!r}") from exc

    async def unsubscribe(self, sub: Subscription) -> None:
        try:
            await sub.unsubscribe()
        except nats.errors.Error as exc:
            raise BusUnavailable(f"unsubscribe from {sub.subject} failed: {exc!r}") from exc

    def new_inbox(self) -> str:
        """A unique subject for replies to this connection."""
        return self.nc.new_inbox()

    async def respond(self, msg: Msg, reply: Message) -> None:
        if msg.reply:
            await self.publish(msg.reply, reply)

    # --- stream consumers and buckets -------------------------------------------------------------
    async def pull_consumer(self, stream: str, spec: ConsumerSpec, update: bool = True) -> PullConsumer:
        """Create the durable consumer ``spec`` on ``stream`` and bind a pull subscription to it.

        ``update``: an existing consumer takes ``spec``'s settings; when the server refuses that (a
        setting that cannot change) the consumer is used as it is and the refusal logged. Without
        ``update`` an existing consumer is used as it is.
        """
        config = spec.to_config()
        try:
            if update:
                try:
                    await self.js.add_consumer(stream, config=config)
                except nats.js.errors.APIError as exc:
                    await self.js.consumer_info(stream, spec.durable)  # raises if it does not exist
                    log.warning("consumer_update_refused", consumer=spec.durable, error=exc.description)
                sub = await self.js.pull_subscribe_bind(durable=spec.durable, stream=stream)
            else:
                sub = await self.js.pull_subscribe(spec.filter_subject, durable=spec.durable, stream=stream,
                                                   config=config)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise BusUnavailable(f"cannot set up consumer {spec.durable} on {stream}: {exc!r}") from exc
        return PullConsumer(sub, stream, spec.durable)

    async def subscribe_stream(self, subject: str, stream: str,
                               cb: Callable[[Msg], Awaitable[None]]) -> Subscription:
        """An ordered consumer of ``stream`` from the first message it retains (pending limits as
        ``subscribe``); the server keeps no state for it."""
        try:
            return await self.js.subscribe(
                subject, stream=stream, cb=cb, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL,
                pending_msgs_limit=self.cfg.pending_msgs_limit, pending_bytes_limit=self.cfg.pending_bytes_limit)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise BusUnavailable(f"cannot consume {stream}: {exc!r}") from exc

    async def key_value(self, bucket: str, ttl_s: float, max_bytes: int) -> KeyValue:
        """The key-value bucket, created on first use (history 1). Created meanwhile by another
        component with other settings: used as it is (the first one's settings win)."""
        try:
            try:
                return await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                pass
            try:
                return await self.js.create_key_value(bucket=bucket, ttl=ttl_s, history=1, max_bytes=max_bytes)
            except nats.js.errors.BadRequestError:
                return await self.js.key_value(bucket)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise BusUnavailable(f"cannot open the bucket {bucket}: {exc!r}") from exc


def _read_secret(path: str) -> str:
    """A password from a file (its first line); BusUnavailable when it cannot be read."""
    if not path:
        raise BusUnavailable("bus.user is set but bus.password_file is not")
    try:
        return open(path).read().splitlines()[0].strip()  # noqa: SIM115 (one read)
    except (OSError, IndexError) as exc:
        raise BusUnavailable(f"cannot read the NATS password from {path}: {exc}") from exc
