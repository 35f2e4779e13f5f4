"""Arrival processes: fixed concurrency (closed loop), Poisson and trace replay (open loop).

``parse_arrival("concurrency:8" | "poisson:2.5" | "trace")`` reads the command-line form.

- **concurrency N**: N virtual users; each takes the next session and runs its steps one after
  the other (each step waits for the previous one plus its pause), so at most N requests are in
  flight. A request's scheduled time is when its user was ready to send it.
- **poisson R**: sessions start as a Poisson process of R sessions per second (seeded,
  ``poisson_times``); a session's later steps follow its previous step as above.
- **trace**: sessions start at the trace's timestamps (``trace.py``; single-step sessions).

Open-loop runs are bounded: at most ``max_inflight`` requests in flight and ``max_open`` sessions
open. When either is full the client falls behind: the request is sent late, and since latencies
are measured from its scheduled time, the delay is charged as latency (no coordinated
omission); ``late`` counts such requests. ``max_requests`` and ``duration_s`` stop the run:
no request is scheduled past either; requests already in flight finish (each is bounded by its
client's timeout). A failed step ends its session (later steps build on its output).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import numpy as np

from kvrelay.loadtest.metrics import RequestRecord
from kvrelay.loadtest.plan import BenchRequest, SessionPlan

Send = Callable[[BenchRequest, float], Awaitable[RequestRecord]]
LATE_S = 0.010  # a request sent this much after its scheduled time counts as late


class ArrivalError(ValueError):
    """An arrival process spec is malformed."""


@dataclass(frozen=True)
class Arrival:
    kind: str  # "concurrency", "poisson", "trace"
    value: float = 0.0  # users for concurrency, sessions/s for poisson

    def describe(self) -> str:
        if self.kind == "concurrency":
            return f"fixed concurrency {int(self.value)}"
        if self.kind == "poisson":
            return f"Poisson, {self.value:g} sessions/s"
        return "trace replay (timestamps from the file)"


def parse_arrival(spec: str) -> Arrival:
    kind, _, raw = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "trace":
        if raw:
            raise ArrivalError(f"arrival 'trace' takes no value, got {spec!r}")
        return Arrival("trace")
    if kind not in ("concurrency", "poisson"):
        raise ArrivalError(f"arrival must be concurrency:N, poisson:RATE or trace, got {spec!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ArrivalError(f"arrival {spec!r}: {kind} needs a number, e.g. {kind}:4") from None
    if kind == "concurrency" and (value < 1 or not value.is_integer()):
        raise ArrivalError(f"concurrency must be a whole number >= 1, got {raw!r}")
    if kind == "poisson" and not 0 < value < float("inf"):
        raise ArrivalError(f"poisson rate must be > 0 sessions/s, got {raw!r}")
    return Arrival(kind, value)


def poisson_times(n: int, rate: float, seed: int) -> list[float]:
    """``n`` start times of a Poisson process of ``rate`` per second, the first at 0 (seeded)."""
    if n < 0 or not rate > 0:
        raise ArrivalError("poisson_times needs n >= 0 and rate > 0")
    if n == 0:
        return []
    gaps = np.random.default_rng([seed, 0x5EED]).exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


class Driver:
    """Sends sessions' requests through ``send`` under one arrival process; owns its tasks."""

    def __init__(self, send: Send, *, max_requests: int | None = None, duration_s: float | None = None,
                 max_inflight: int = 1024, max_open: int = 4096, pause_scale: float = 1.0,
                 on_record: Callable[[RequestRecord], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if max_inflight < 1 or max_open < 1 or pause_scale < 0:
            raise ArrivalError("max_inflight and max_open must be >= 1, pause_scale >= 0")
        self._send, self._clock, self._sleep, self._on_record = send, clock, sleep, on_record
        self.max_requests, self.duration_s, self.pause_scale = max_requests, duration_s, pause_scale
        self._inflight = asyncio.Semaphore(max_inflight)
        self._open = asyncio.Semaphore(max_open)
        self.records: list[RequestRecord] = []
        self.scheduled = 0
        self.late = 0
        self.t0 = 0.0

    # --- shared -------------------------------------------------------------------------------
    def _may_schedule(self, at: float) -> bool:
        if self.max_requests is not None and self.scheduled >= self.max_requests:
            return False
        return self.duration_s is None or at - self.t0 < self.duration_s

    async def _sleep_until(self, at: float) -> None:
        delay = at - self._clock()
        if delay > 0:
            await self._sleep(delay)

    async def _session(self, plan: SessionPlan, first_at: float) -> None:
        at = first_at
        for i, req in enumerate(plan.steps):
            if i:
                at = self._clock() + req.delay_s * self.pause_scale
            if not self._may_schedule(at):
                return
            await self._sleep_until(at)
            if not self._may_schedule(at):  # another session may have taken the last request meanwhile
                return
            self.scheduled += 1
            async with self._inflight:
                if self._clock() - at > LATE_S:
                    self.late += 1
                rec = await self._send(req, at)
            self.records.append(rec)
            if self._on_record is not None:
                self._on_record(rec)
            if not rec.ok:
                return

    @staticmethod
    async def _reap(tasks: set[asyncio.Task]) -> None:
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- open loop: Poisson, trace ---------------------------------------------------------------
    async def run_open(self, plans: list[SessionPlan]) -> list[RequestRecord]:
        """Each session starts at ``t0 + plan.start_s`` (plans sorted by start)."""
        self.t0 = self._clock()
        tasks: set[asyncio.Task] = set()

        async def one(plan: SessionPlan, at: float) -> None:
            try:
                await self._session(plan, at)
            finally:
                self._open.release()

        try:
            for plan in sorted(plans, key=lambda p: p.start_s):
                at = self.t0 + plan.start_s
                if not self._may_schedule(at):
                    break
                await self._sleep_until(at)
                if not self._may_schedule(at):
                    break
                await self._open.acquire()
                task = asyncio.create_task(one(plan, at))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        await self._reap(set(tasks))
        return self.records

    # --- closed loop: fixed concurrency ------------------------------------------------------------
    async def run_closed(self, plans: list[SessionPlan], users: int) -> list[RequestRecord]:
        if users < 1:
            raise ArrivalError("concurrency must be >= 1")
        self.t0 = self._clock()
        queue: Iterator[SessionPlan] = iter(plans)

        async def user() -> None:
            for plan in queue:  # one shared iterator: each session goes to one user
                if not self._may_schedule(self._clock()):
                    return
                await self._session(plan, self._clock())

        tasks = {asyncio.create_task(user()) for _ in range(users)}
        await self._reap(tasks)
        return self.records


async def drive(send: Send, plans: list[SessionPlan], arrival: Arrival, **kw: object) -> Driver:
    """Run ``plans`` under ``arrival`` to completion; the driver holds the records and counters."""
    d = Driver(send, **kw)  # type: ignore[arg-type]
    if arrival.kind == "concurrency":
        await d.run_closed(plans, int(arrival.value))
    else:
        await d.run_open(plans)
    return d

