"""The dispatcher: sends a request to a prefill worker and reads its token stream back.

One ``Flight`` per request, opened by ``Dispatcher.open`` (``max_inflight``, waiting included):

1. ``dispatch``: subscribe to the stream subject (once) *before* sending anything, pick a live
   prefill worker with the policy (reported load merged with this router's dispatch-time counts),
   send the ``PrefillTask`` by request/reply and, on refusal or no answer, try the plan's
   fallbacks. All refuse -> ``Overloaded``, which ``Admission.place`` (router/admission.py)
   turns into a wait in its queue, woken from here (``_closed``, first token, Cancel). No live
   worker -> ``NoWorkersAvailable`` (503). A local-prefill plan (``router/local_prefill.py``)
   goes to the decode worker (``local.<worker>``); if it does not take it, the prefill path follows.
2. ``next_chunk``: the ``TokenChunk``s in ``seq`` order (``ReorderBuffer``), within the first-token
   timeout and the deadline (``DeadlineExceeded``); an error chunk raises ``UpstreamError``.
3. ``close``: unsubscribe, release the slot, and publish ``Cancel`` on ``cancel.<request>`` when
   the stream did not finish and a worker took the task or may have (it did not answer in time),
   so the prefill and decode workers both stop. A request every worker refused is not cancelled.

A ``Cancel`` seen on the bus for a request here ends its flight (or its wait) too. ``flights``
holds exactly the ledger's requests (``max_inflight``), admitted by ``open``, released by ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kvrelay.base.logs import get_logger
from kvrelay.base.tasks import reraise_swallowed_cancel, wait_event
from kvrelay.router.admission import Admission, TenantBook
from kvrelay.router.config import RouterConfig
from kvrelay.router.errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    NoWorkersAvailable,
    Overloaded,
    RouterError,
    UpstreamError,
)
from kvrelay.router.ledger import DuplicateRequest, InflightFull, LoadLedger
from kvrelay.router.local_prefill import LocalRouting
from kvrelay.router.metrics import RouterMetrics
from kvrelay.router.policy import NoWorkers, Plan, Policy, RouteRequest, RouteResult, WorkerView
from kvrelay.router.policy_factory import needs_hashes
from kvrelay.router.reorder import ReorderBuffer
from kvrelay.router.watch import Watched
from kvrelay.schemas.codec import unpack
from kvrelay.schemas.errors import SchemaError
from kvrelay.schemas.messages import Cancel, DispatchReply, ErrorInfo, PrefillTask, SamplingSpec, TokenChunk
from kvrelay.transport.bus import Bus
from kvrelay.transport.discovery import Directory
from kvrelay.transport.errors import BusTimeout, BusUnavailable

log = get_logger(__name__)

Hasher = Callable[[Sequence[int], str], Sequence[int]]


class Dispatcher:
    """Owns the load ledger (``table``: admission and dispatch-time load, read by the policy) and
    the flights; ``start``/``stop`` its Cancel subscription."""

    def __init__(self, bus: Bus, directory: Directory, policy: Policy, cfg: RouterConfig,
                 metrics: RouterMetrics, router_id: str, hasher: Hasher | None = None,
                 tenants: TenantBook | None = None) -> None:
        self.bus, self.directory, self.policy, self.cfg = bus, directory, policy, cfg
        self.metrics, self.router_id, self.hasher = metrics, router_id, hasher
        self.table = LoadLedger(cfg.max_inflight)
        policy.bind(self.table)
        self.local = LocalRouting(cfg, metrics.registry)
        self.admission = Admission(cfg, metrics, tenants=tenants)
        self.flights: dict[str, Flight] = {}
        self._cancel_sub: Subscription | None = None

    async def start(self) -> None:
        self._cancel_sub = await self.bus.subscribe(self.bus.subjects.cancel_all, self._on_cancel)

    async def stop(self) -> None:
        for flight in list(self.flights.values()):
            await flight.close()
        if self._cancel_sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._cancel_sub.unsubscribe()
            self._cancel_sub = None

    def max_context(self, fallback: int | None) -> int | None:
        """The smallest context (prompt + output tokens) any live prefill or decode worker serves.

        Workers advertise their engine's ``max_model_len``; the model's own limit is the fallback.
        """
        sizes = [w.max_model_len for w in self.directory.live() if w.max_model_len > 0]
        if fallback:
            sizes.append(fallback)
        return min(sizes) if sizes else None

    def open(self, request_id: str, tenant: str, timeout_s: float, arrival_ms: int | None = None) -> Flight:
        """Hold a request (until ``close``); raises Overloaded at ``max_inflight`` or BadRequest for an id here.

        ``arrival_ms`` (epoch ms) defaults to now; the deadline is arrival plus
        ``min(timeout_s, request_timeout_s)``.
        """
        try:
            self.table.admit(request_id)
        except InflightFull as exc:
            raise self.admission.overloaded(f"the router is at its limit of {self.cfg.max_inflight} requests in "
                                            f"flight; retry later", "max_inflight") from exc
        except DuplicateRequest as exc:
            raise BadRequest(str(exc), param="request_id") from exc
        now_ms = int(time.time() * 1000)
        arrival_ms = now_ms if arrival_ms is None else arrival_ms
        budget_s = min(timeout_s, self.cfg.request_timeout_s) - max(0, now_ms - arrival_ms) / 1000
        flight = Flight(self, request_id, tenant, budget_s, arrival_ms)
        self.flights[request_id] = flight
        self.metrics.inflight.set(len(self.table))
        return flight

    def _closed(self, flight: Flight) -> None:
        self.flights.pop(flight.request_id, None)
        self.table.release(flight.request_id)
        self.metrics.inflight.set(len(self.table))
        self.admission.settle(flight)
        self.admission.wake()

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = unpack(msg.data, Cancel)
        except SchemaError:
            return
        flight = self.flights.get(cancel.request_id)
        if flight is not None and flight.tenant == msg.subject.split(".")[-2]:  # only its tenant's cancel
            flight.cancelled(cancel.reason)
            self.admission.cancel(cancel.request_id, cancel.reason)


class Flight:
    """One request through this router. Not reusable; ``close()`` always (it is idempotent)."""

    def __init__(self, d: Dispatcher, request_id: str, tenant: str, budget_s: float, arrival_ms: int) -> None:
        self._d = d
        self.request_id, self.tenant, self.arrival_ms = request_id, tenant, arrival_ms
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.deadline_ms = int(time.time() * 1000 + budget_s * 1000)
        self.worker = ""
        self.local = False  # the worker is a decode worker prefilling locally
        self.prompt_tokens = 0
        self.max_tokens = 0  # asked, as dispatched
        self.output_tokens = 0  # received in chunks read (next_chunk)
        self.charged_output = 0  # output tokens charged to its tenant (fair order), refunded at close
        self.session_id = ""
        self._prompt: list[int] = []
        self._hashes: Sequence[int] | None = None
        self._output: list[int] = []  # output token ids, kept for a session's record only
        self.first_token_at: float | None = None
        self.finished = False
        self.closed = False
        self._buffer = ReorderBuffer(d.cfg.max_buffered_chunks)
        self._wake = asyncio.Event()
        self._failure: RouterError | None = None
        self._sub: Subscription | None = None
        self._maybe_taken = False  # a worker may hold the task (it took it, or did not answer)
        self._first_deadline = self.deadline
        self._last_chunk_at = 0.0
        self.stream_worker = ""  # the worker other than ``worker`` whose chunks arrive (router/watch.py)
        self._started: dict[str, int] = {}  # worker -> its record's started_ms when it took this request
        self._last_heard = 0.0  # when the last chunk was received

    @property
    def maybe_taken(self) -> bool:
        """A worker holds the task or may hold it (it took it, or did not answer in time)."""
        return self._maybe_taken

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def next_seq(self) -> int:
        return self._buffer.next_seq

    # --- dispatch ---------------------------------------------------------------------------------
    async def dispatch(self, token_ids: list[int], sampling: SamplingSpec, stream_subject: str,
                       session_id: str = "", kv_ttl_s: float = 0.0) -> str:
        """Send the task to a prefill worker (or, on a local plan, a decode worker); returns the
        worker that took it. ``session_id`` ("" = none) names the client's session; ``kv_ttl_s``
        asks its decode worker to keep the step's KV that long for the session's next step."""
        d = self._d
        infos = d.directory.live("prefill")
        views = d.table.views(infos)
        if not views:  # the more telling reason, also when the deadline has passed meanwhile
            raise NoWorkersAvailable("no prefill worker is available", retry_after_s=1.0)
        if self.remaining() <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was dispatched")
        self.prompt_tokens, self._prompt, self.session_id = len(token_ids), token_ids, session_id
        self.max_tokens = sampling.max_tokens
        if self._sub is None:  # dispatched again after waiting its turn
            self._sub = await d.bus.subscribe(stream_subject, self._on_chunk)
        hashes = d.hasher(token_ids, self.tenant) if d.hasher and needs_hashes(d.policy) else None
        self._hashes = hashes
        request = d.local.route_request(self.request_id, self.tenant, len(token_ids), hashes, session_id,
                                        d.directory.live("decode") if hashes is not None else ())
        plan = self._decide(request, views)
        task = PrefillTask(
            request_id=self.request_id, tenant=self.tenant, prompt_token_ids=token_ids, sampling=sampling,
            stream_subject=stream_subject, deadline_ms=self.deadline_ms, router_id=d.router_id,
            arrival_ms=self.arrival_ms, session=f"{self.tenant}/{session_id}" if session_id else "",
            kv_ttl_ms=int(kv_ttl_s * 1000) if session_id else 0,
        )
        if plan.mode == "local":
            if await self._local(plan, task):
                return self.worker
            plan = self._decide(dataclasses.replace(request, previous_decode="", previous_blocks=0,
                                                    decode_candidates=()), views)
        block_size = {i.worker_id: i.block_size for i in infos}
        refusals = []
        for wid in (plan.worker_id, *plan.fallbacks):
            if self.remaining() <= 0:
                raise DeadlineExceeded("the request's deadline passed while prefill workers refused it")
            cached = plan.cached_blocks * block_size.get(wid, 0) if wid == plan.worker_id else 0
            d.table.assign(self.request_id, wid, len(token_ids), cached)
            d.policy.update(RouteResult(self.request_id, wid, "dispatched", len(token_ids), cached))
            reason = await self._try(wid, task.replace(cached_tokens=cached))
            if reason is None:
                self._taken(wid)
                return wid
            d.table.unassign(self.request_id)
            d.policy.update(RouteResult(self.request_id, wid, "rejected"))
            d.metrics.dispatch_rejections.labels(reason).inc()
            refusals.append(reason)
        raise Overloaded(f"all prefill workers are busy ({len(refusals)} tried: {', '.join(refusals)})")

    def _decide(self, request: RouteRequest, views: list[WorkerView]) -> Plan:
        try:
            return self._d.local.decided(self._d.policy.decide(request, views), self.request_id)
        except NoWorkers as exc:
            raise NoWorkersAvailable(str(exc), retry_after_s=1.0) from exc

    def _taken(self, worker_id: str) -> None:
        self.worker = worker_id
        self._started[worker_id] = self._d.directory.started_ms(worker_id)
        self._first_deadline = min(self.deadline, time.monotonic() + self._d.cfg.first_token_timeout_s)

    async def _local(self, plan: Plan, task: PrefillTask) -> bool:
        """Offer the task to the plan's decode worker for a local prefill; True when it took it."""
        d, wid = self._d, plan.worker_id
        if self.remaining() <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was dispatched")
        info = d.directory.get(wid)
        cached = plan.cached_blocks * (info.block_size if info else 0)
        d.table.assign(self.request_id, wid, self.prompt_tokens, cached)
        reason = await self._try(wid, task.replace(cached_tokens=cached), local=True)
        d.local.metrics.dispatches.labels(plan.reason or "local", reason or "accepted").inc()
        if reason is None:
            self.local = True
            self._taken(wid)
            return True
        d.table.unassign(self.request_id)
        return False

    async def _try(self, worker_id: str, task: PrefillTask, local: bool = False) -> str | None:
        """None when ``worker_id`` took the task, else why not. ``local``: a decode worker's local
        prefill (any refusal, "invalid" included, leaves the prefill path open)."""
        d = self._d
        timeout = max(0.01, min(d.cfg.dispatch_timeout_s, self.remaining()))
        subject = d.bus.subjects.local_prefill(worker_id) if local else d.bus.subjects.prefill(worker_id)
        # a worker that reads the offer only after half the wait refuses it: when the reply does not
        # come in time, the request can go elsewhere without also running here
        offer = task.replace(accept_by_ms=int(time.time() * 1000 + timeout * 500))
        before, self._maybe_taken = self._maybe_taken, True  # cancelled mid-request: it may have it
        try:
            reply = await d.bus.request(subject, offer, DispatchReply, timeout=timeout)
        except BusUnavailable:
            self._maybe_taken = before
            return "unreachable"
        except BusTimeout:
            return "timeout"
        except (SchemaError, ValueError) as exc:
            log.warning("bad_dispatch_reply", worker=worker_id, error=str(exc))
            return "bad_reply"
        finally:
            reraise_swallowed_cancel()
        if reply.accepted:
            return None
        self._maybe_taken = before
        if reply.code == "invalid" and not local:
            raise BadRequest(f"the prefill worker refused the request: {reply.reason}")
        log.info("dispatch_refused", request_id=self.request_id, worker=worker_id, code=reply.code,
                 reason=reply.reason)
        return reply.code or "rejected"

    # --- the token stream -------------------------------------------------------------------------
    async def _on_chunk(self, msg: Msg) -> None:
        metrics = self._d.metrics
        try:
            chunk = unpack(msg.data, TokenChunk)
        except SchemaError as exc:
            metrics.chunks_dropped.labels("undecodable").inc()
            log.warning("bad_token_chunk", request_id=self.request_id, error=str(exc))
            return
        if chunk.request_id != self.request_id:
            metrics.chunks_dropped.labels("foreign").inc()
            return
        result = self._buffer.push(chunk)
        self._last_heard = time.monotonic()
        if chunk.worker and chunk.worker != self.worker and chunk.worker != self.stream_worker:
            self.stream_worker = chunk.worker
            self._started[chunk.worker] = self._d.directory.started_ms(chunk.worker)
        if result == "overflow":
            self._fail(RouterError(f"more than {self._buffer.capacity} token chunks could not be put in order"))
        elif result != "ok":
            metrics.chunks_dropped.labels(result).inc()
        self._wake.set()

    def _fail(self, error: RouterError) -> None:
        if self._failure is None:
            self._failure = error
        self._wake.set()

    def watched(self) -> Watched:
        return Watched(self.worker, self.local, self.stream_worker, self.finished, self._last_heard, self._started)

    def lost(self, error: RouterError) -> None:
        """The watch found its worker gone or its stream stalled (router/watch.py)."""
        self._fail(error)

    def cancelled(self, reason: str) -> None:
        """A Cancel for this request was seen on the bus."""
        self._fail(Cancelled(f"the request was cancelled: {reason}"))

    async def next_chunk(self) -> TokenChunk:
        """The next chunk in order. Raises DeadlineExceeded, UpstreamError or Cancelled."""
        while True:
            self._wake.clear()
            chunk = self._buffer.pop()
            if chunk is not None:
                self._arrived(chunk)
                return chunk
            if self._failure is not None:
                raise self._failure
            if self.finished:
                raise RouterError("the stream already ended")
            limit = self._first_deadline if self.first_token_at is None else self.deadline
            wait = limit - time.monotonic()
            if wait <= 0:
                raise self._timeout_error()
            await wait_event(self._wake, wait)

    def _timeout_error(self) -> DeadlineExceeded:
        if self.first_token_at is None and self._first_deadline < self.deadline:
            return DeadlineExceeded(f"no first token within {self._d.cfg.first_token_timeout_s:g} s")
        return DeadlineExceeded(f"the request did not finish within its deadline of "
                                f"{self.deadline - self.started:.3g} s")

    def _arrived(self, chunk: TokenChunk) -> None:
        d, now = self._d, time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            d.metrics.ttft.observe(now - self.started)
            d.table.prefill_done(self.request_id)
            d.admission.wake()
            d.policy.update(RouteResult(self.request_id, self.worker, "finished"))
        else:
            d.metrics.inter_token.observe(now - self._last_chunk_at)
        self._last_chunk_at = now
        self.output_tokens += len(chunk.token_ids)
        if self.session_id:
            self._output.extend(chunk.token_ids)
        if chunk.finish_reason is None:
            return
        self.finished = True
        d.table.unassign(self.request_id)  # no longer load on its worker; the slot frees at close()
        if chunk.finish_reason in ("error", "abort"):
            info = chunk.error or ErrorInfo(code="aborted", message="the worker aborted the request", status=500)
            d.policy.update(RouteResult(self.request_id, self.worker, "failed"))
            raise UpstreamError(info)
        d.metrics.e2e.observe(now - self.started)
        if self.session_id and chunk.worker:
            d.local.finished(self.tenant, self.session_id, d.directory.get(chunk.worker), self._prompt,
                             self._output, self._hashes, d.hasher)

    # --- the end ----------------------------------------------------------------------------------
    async def close(self, reason: str = "cancelled", cancel: bool = True) -> None:
        """Unsubscribe, release the slot, and (unless ``cancel`` is false) Cancel the request on
        the bus if it did not finish and a worker holds or may hold it."""
        if self.closed:
            return
        self.closed = True
        d = self._d
        if not self.finished and self.worker:
            d.policy.update(RouteResult(self.request_id, self.worker, "failed"))
        d._closed(self)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, BusUnavailable):
                await self._sub.unsubscribe()
        if cancel and not self.finished and self._maybe_taken:
            try:
                await d.bus.publish(d.bus.subjects.cancel(self.tenant, self.request_id),
                                    Cancel(request_id=self.request_id, reason=reason[:256]))
            except BusUnavailable as exc:
                log.warning("cancel_publish_failed", request_id=self.request_id, error=str(exc))
