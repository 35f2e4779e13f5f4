"""JetStream pull consumers as the bus hands them out: ``PullConsumer`` fetches ``Delivery`` messages.

``Bus.pull_consumer`` creates the durable consumer from a ``ConsumerSpec`` and binds a
``PullConsumer``. Everything here raises ``transport.errors`` only: a fetch that finds nothing
within its timeout returns ``[]``; other failures raise ``TransportError`` (``BusUnavailable``
when the connection is the cause). A ``Delivery`` is settled with ``ack`` / ``nak`` / ``term`` /
``in_progress``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from kvrelay.base.tasks import reraise_swallowed_cancel
from kvrelay.transport.errors import BusUnavailable, TransportError


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer with explicit acks, from the stream's first message. ``None`` leaves a setting at the server's default
    (``max_ack_pending=-1``: unlimited); ``inactive_s`` deletes the consumer after that long unused."""

    durable: str
    filter_subject: str
    ack_wait_s: float
    max_deliver: int | None = None
    max_ack_pending: int | None = None
    max_waiting: int | None = None
    inactive_s: float | None = None

    def to_config(self) -> ConsumerConfig:
        return ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            filter_subject=self.filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=self.max_ack_pending,
            max_waiting=self.max_waiting,
            inactive_threshold=self.inactive_s,
        )


def _failed(what: str, exc: BaseException) -> TransportError:
    if isinstance(exc, (nats.errors.ConnectionClosedError, nats.errors.NoServersError,
                        nats.errors.ConnectionDrainingError, nats.errors.StaleConnectionError)):
        return BusUnavailable(f"{what}: {exc!r}")
    return TransportError(f"{what}: {exc!r}")


class Delivery:
    """One message from a pull consumer. Settling it may raise ``TransportError`` (a lost ack means
    a redelivery after the consumer's ack wait)."""

    __slots__ = ("_msg",)

    def __init__(self, msg: Msg) -> None:
        self._msg = msg

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    def timestamp_ms(self) -> int | None:
        """When the stream stored the message (ms since the epoch); None if unknown."""
        try:
            return int(self._msg.metadata.timestamp.timestamp() * 1000)
        except (nats.errors.Error, ValueError, AttributeError, OverflowError):
            return None

    def num_pending(self) -> int:
        """Messages still waiting for this consumer when this one was delivered (0 if unknown)."""
        try:
            return int(self._msg.metadata.num_pending or 0)
        except (nats.errors.Error, ValueError, AttributeError, IndexError, TypeError):
            return 0

    async def ack(self) -> None:
        await self._settle("ack", self._msg.ack())

    async def nak(self, delay: float | None = None) -> None:
        await self._settle("nak", self._msg.nak(delay=delay))

    async def term(self) -> None:
        await self._settle("term", self._msg.term())

    async def in_progress(self) -> None:
        await self._settle("in_progress", self._msg.in_progress())

    async def _settle(self, how: str, op: Any) -> None:
        try:
            await op
        except nats.errors.Error as exc:
            raise _failed(f"{how} of a message on {self.subject} failed", exc) from exc


class PullConsumer:
    """A bound pull subscription on a durable consumer (``Bus.pull_consumer``)."""

    def __init__(self, sub: Any, stream: str, durable: str) -> None:
        self._sub, self.stream, self.durable = sub, stream, durable

    async def fetch(self, most: int, timeout: float) -> list[Delivery]:
        """Up to ``most`` messages; ``[]`` when none came within ``timeout``."""
        try:
            msgs = await self._sub.fetch(most, timeout=timeout)
        except asyncio.TimeoutError:  # nats raises its own subclass or the plain one, by path
            return []
        except nats.errors.Error as exc:
            raise _failed(f"fetch from {self.durable} on {self.stream} failed", exc) from exc
        finally:
            reraise_swallowed_cancel()  # nats' wait_for can drop our cancellation
        return [Delivery(m) for m in msgs]

    async def unsubscribe(self) -> None:
        try:
            await self._sub.unsubscribe()
        except nats.errors.Error as exc:
            raise _failed(f"unsubscribe from {self.durable} failed", exc) from exc
