"""The decode side's JetStream consumers on the ``prefilled`` work queue, and message settlement.

Two durable pull consumers feed a decode worker, with non-overlapping filters (a work-queue
stream requires it):

- ``decode`` on ``kvrelay.<ns>.prefilled``, shared by every decode worker (load balancing);
- ``decode_<id>`` on ``kvrelay.<ns>.prefilled.<id>``, this worker's own (multi-step affinity);
  JetStream deletes it after ``AFFINITY_INACTIVE_S`` without a pull.

``DecodeSlots`` shares the worker's slots between those pulls and local prefills.
"""

from __future__ import annotations

import asyncio

from kvrelay.base.logs import get_logger
from kvrelay.transport.bus import Bus
from kvrelay.transport.errors import TransportError
from kvrelay.transport.jetstream import ConsumerSpec, Delivery, PullConsumer
from kvrelay.workers.config import DecodeConfig
from kvrelay.workers.slots import Slots

log = get_logger(__name__)

AFFINITY_INACTIVE_S = 3600.0
FETCH_ERRORS = (TransportError, asyncio.TimeoutError)
# how long fetching the backlog behind a first message may wait (only another worker taking those
# messages first makes it wait at all)
BACKLOG_FETCH_S = 0.05


def affinity_durable(worker_id: str) -> str:
    return f"decode_{worker_id}"


def consumer_config(cfg: DecodeConfig, durable: str, subject: str,
                    inactive_s: float | None) -> ConsumerSpec:
    return ConsumerSpec(
        durable=durable,
        filter_subject=subject,
        ack_wait_s=cfg.ack_wait_s,
        max_deliver=cfg.max_deliver,
        max_ack_pending=cfg.max_ack_pending,
        max_waiting=512,
        inactive_s=inactive_s,
    )


async def pull_consumer(bus: Bus, spec: ConsumerSpec) -> PullConsumer:
    """Create (or update to ``spec``) the durable consumer on the work queue and bind a pull to it.

    The shared consumer takes the settings of the last decode worker that started. If the server
    refuses the update (a setting that cannot change), the existing consumer is used as it is and
    the refusal is logged.
    """
    return await bus.pull_consumer(bus.subjects.stream_prefilled, spec, update=True)


async def fetch_promptly(sub: PullConsumer, most: int, wait_s: float) -> list[Delivery]:
    """Up to ``most`` messages, returned as soon as one is there (TimeoutError after ``wait_s``).

    On its lingering path (a pull re-sent after a status reply), nats-py's ``fetch(n)`` goes on
    waiting after the first message until ``n`` have come or the fetch expires. In ``bench
    compare`` runs that held handovers in the decode worker for up to ~1 s (the longest gap
    between a stream's first and second token: 0.64-0.99 s in 5 runs with ``fetch(4)``, 0.21 and
    0.23 s in 2 runs with this). So the long wait asks for one message; when that one says more
    are pending, up to ``most - 1`` of them follow in a second, short fetch. Errors of that second
    fetch keep the first message.
    """
    msgs = await sub.fetch(1, wait_s)
    if not msgs:
        raise asyncio.TimeoutError(f"no message within {wait_s} s")
    pending = msgs[-1].num_pending()
    if most > 1 and pending > 0:
        try:
            msgs += await sub.fetch(min(most - 1, pending), min(wait_s, BACKLOG_FETCH_S))
        except TransportError as exc:
            log.warning("fetch_failed", error=repr(exc))
    return msgs


async def settle(msg: Delivery, how: str) -> None:
    """ack / term / nak / in_progress, never raising: a lost ack means a redelivery, handled there."""
    try:
        if how == "ack":
            await msg.ack()
        elif how == "term":
            await msg.term()
        elif how == "nak":
            await msg.nak()
        else:
            await msg.in_progress()
    except TransportError as exc:
        log.warning("settle_failed", how=how, error=repr(exc))


class DecodeSlots(Slots):
    """``Slots`` where a local prefill (``workers/local_prefill.py``) may run ahead of the pulls.

    Pull loops reserve slots before they fetch (``acquire``), so an idle worker's free slots are
    mostly reserved. A local prefill is admitted while fewer than ``capacity`` requests *run*
    (``take_local(running)``): it takes a free slot, or else *borrows* one a pull holds in reserve
    (``borrowed``). Every slot released while some are borrowed repays a borrow instead of
    becoming free, and a pull loop starts a fetched message only while fewer than ``capacity``
    requests run, so running requests never exceed ``capacity``. A message that arrives within its
    reservation while borrows fill every slot is held (``in_progress``) until a slot is given back
    (``freed``), not nak'ed: a nak would spend one of its ``max_deliver`` deliveries.
    Full (``running >= capacity``): ``take_local`` says no; the router then takes the prefill path.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.borrowed = 0
        self.freed = asyncio.Event()  # set whenever a running request gives its slot (or borrow) back

    def take_local(self, running: int) -> bool:
        if running >= self.capacity:
            return False
        if self.free > 0:
            self.used += 1
        else:
            self.borrowed += 1
        return True

    def give_local(self) -> None:
        """A local prefill ended: its slot (or its borrow) is given back."""
        if self.borrowed:
            self.borrowed -= 1
        else:
            super().release(1)
        self.freed.set()

    def release(self, n: int = 1) -> None:
        repay = min(self.borrowed, n)
        self.borrowed -= repay
        if n - repay:
            super().release(n - repay)
        if n:
            self.freed.set()
