"""Every request in flight is watched: a stream whose worker is gone, or that went silent, ends
with one clear error instead of hanging until its deadline.

Which worker a flight depends on changes as it goes (``verdict``, pure):

- before its first token: the worker that took the task (a prefill worker, or the decode worker
  of a local prefill);
- after the first token of a handed-over request: nobody, while the handover waits in the
  ``prefilled`` work queue for a decode worker (the prefill worker's part is done; the request's
  deadline bounds the wait); then the decode worker whose chunks arrive;
- a local prefill stays on its decode worker throughout.

That worker is *gone* when discovery no longer lists it (``transport.discovery.Directory``: its
record was deleted on a clean leave, or not refreshed within ``bus.worker_ttl_s``) or lists it with
another start time (restarted under the same id, as ``kvrelay up`` does), and *stalled*
when no chunk of the request arrived for ``router.stream_stall_timeout_s`` after the first token.
``FlightWatch.run`` checks every flight each ``router.watch_interval_s``; a lost flight fails with
``WorkerLost`` (503, code ``worker_lost``) or ``StreamStalled`` (504, code ``stream_stalled``), its
client gets exactly that one error, and closing the flight cancels the request on the bus so a
worker that is only slow stops too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvrelay.base.logs import get_logger
from kvrelay.router.errors import RouterError, StreamStalled, WorkerLost

if TYPE_CHECKING:
    from kvrelay.router.dispatcher import Dispatcher

log = get_logger(__name__)


@dataclass(frozen=True)
class Watched:
    """What the watch needs to know of one flight."""

    worker: str  # the worker that took the task ("" = not dispatched yet)
    local: bool  # a local prefill: ``worker`` is a decode worker and streams the whole request
    stream_worker: str  # the worker other than ``worker`` whose chunks arrive ("" = none yet)
    finished: bool
    last_heard: float  # monotonic time of the last chunk received (0 = none: no token yet)
    started_ms: Mapping[str, int] = field(default_factory=dict)  # worker -> started_ms it served under


GONE_GRACE_S = 1.0
"""A stream heard from this recently is not yet lost when its worker's record goes: a worker that
drains deletes its record right after its last chunk, and the router may read the two in either
order (they arrive on different subscriptions)."""


def verdict(w: Watched, live: Mapping[str, int], stall_s: float, now: float) -> RouterError | None:
    """The error that ends this flight now, or None while it is fine. ``live``: every live worker's
    ``started_ms``; a worker whose record now has another start time was restarted: gone too."""
    if w.finished or not w.worker:
        return None
    if w.local or not w.last_heard:
        watched = w.stream_worker or w.worker
    else:
        watched = w.stream_worker  # "" while the handover waits for a decode worker
    if not watched:
        return None
    if w.last_heard and now - w.last_heard <= GONE_GRACE_S:
        return None
    if watched not in live:
        return WorkerLost(f"worker {watched} serving this request is gone (it left discovery or its "
                          f"heartbeats stopped)")
    if w.started_ms.get(watched) and live[watched] != w.started_ms[watched]:
        return WorkerLost(f"worker {watched} serving this request restarted")
    if w.last_heard and now - w.last_heard > stall_s:
        return StreamStalled(f"no token from worker {watched} for {now - w.last_heard:.1f} s "
                             f"(stall timeout {stall_s:g} s)")
    return None


class FlightWatch:
    """Runs ``verdict`` over the dispatcher's flights until cancelled (the router owns the task)."""

    def __init__(self, dispatcher: Dispatcher, interval_s: float, stall_s: float) -> None:
        self.dispatcher, self.interval_s, self.stall_s = dispatcher, interval_s, stall_s
        self._last_pass: float | None = None

    def check(self, now: float | None = None) -> int:
        """One pass; returns how many flights it failed.

        A pass that comes late (this router's own loop was blocked) judges nothing: heartbeats and
        chunks may be waiting unread in its socket, and would look missing."""
        d = self.dispatcher
        now = time.monotonic() if now is None else now
        last, self._last_pass = self._last_pass, now
        if last is not None and now - last > max(1.0, 4 * self.interval_s):
            log.warning("flight_watch_late", late_s=round(now - last, 3))
            return 0
        live = {i.worker_id: i.started_ms for i in d.directory.live()}
        failed = 0
        for flight in list(d.flights.values()):
            error = verdict(flight.watched(), live, self.stall_s, now)
            if error is not None:
                log.warning("flight_lost", request_id=flight.request_id, code=error.code, reason=error.message)
                d.metrics.streams_lost.labels(error.code).inc()
                flight.lost(error)
                failed += 1
        return failed

    async def run(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(self.interval_s)
