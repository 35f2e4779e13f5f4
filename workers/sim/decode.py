"""The simulated decode engine (``workers.engine.DecodeEngine``); see ``workers.sim.engine``.

A request is admitted when one of ``max_num_seqs`` sequence slots is free (waiting is bounded
by the request's deadline), gets KV blocks for its prompt and output from the block manager
(waiting for other requests to free some if needed), imports the prompt's KV, then decodes.

Import: the descriptor must be a simulated shared-memory export on this host; after the
modelled transfer time the pages are read from the exporter's region (``SimRegionReader``, a
seqlock on the ticket) and must equal this prompt's pages. Any failure (region gone, lease
expired or released, wrong pages, transfer past ``transfer_timeout_s``) falls back to
recomputing the prompt locally (modelled prefill time; ``kv_recomputed`` on the first delta).
Prompt blocks already cached here are neither transferred nor recomputed.

Local prefill (``stream_local``, decode affinity): the whole request runs here. Its prompt's
blocks come from this engine's own block manager; only the uncached tokens cost modelled prefill
time (at least one token, as vLLM recomputes the last one); nothing is transferred. The tokens are
the same as through a prefill worker (``sim_tokens`` of the prompt), the first one included.

Decoding: one background task steps every running sequence by one token per modelled
``decode_step_s(batch)``; each request's generator yields what was produced since its last
delta (a slow reader gets several tokens in one delta), the last one with "length".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvrelay.base.logs import get_logger
from kvrelay.schemas.messages import KVDescriptor, PrefillDone, PrefillTask
from kvrelay.transport.bus import Bus
from kvrelay.transport.errors import (
    ChecksumMismatch,
    KVTransferError,
    LayoutMismatch,
    LeaseExpired,
    PeerGone,
    TransferTimeout,
)
from kvrelay.workers.config import DecodeConfig, EngineConfig
from kvrelay.workers.engine import EngineStats, TokenDelta
from kvrelay.workers.errors import EngineError
from kvrelay.workers.sim.blocks import BlocksFull
from kvrelay.base.ids import now_ms
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.workers.sim.engine import SimEngineBase, sim_tokens, token_text
from kvrelay.workers.sim.region import SimRegionReader, kv_pages

log = get_logger(__name__)

NO_DEADLINE_WAIT_S = 600.0  # how long admission may wait for a request without a deadline
STALL_S = 60.0  # real seconds a sequence may go without a token (plus its modelled steps)


@dataclass
class _Seq:
    tokens: list[int]  # every output token, the first one from prefill
    produced: int = 1  # tokens[:produced] exist
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class SimDecodeEngine(SimEngineBase):
    def __init__(self, engine_cfg: EngineConfig, decode_cfg: DecodeConfig, cache: CacheConfig = CacheConfig(),
                 *, bus: Bus | None = None, worker_id: str = "") -> None:
        super().__init__(engine_cfg, cache, bus=bus, worker_id=worker_id)
        self.transfer_timeout_s = decode_cfg.transfer_timeout_s
        self.reader = SimRegionReader()
        self._slots = asyncio.Semaphore(engine_cfg.max_num_seqs)
        self._aborts: dict[str, asyncio.Event] = {}  # every request inside decode()
        self._running: dict[str, _Seq] = {}  # requests decoding
        self._work = asyncio.Event()  # set when a sequence joins
        self._freed = asyncio.Event()  # set when a request gives its blocks back
        self._stepper: asyncio.Task | None = None
        self._waiting = 0
        self.kv_bytes_moved = 0
        self.counters = dict.fromkeys(("imported", "recomputed", "prefix_hits", "steps", "local_prefills",
                                       "local_computed_tokens"), 0)

    async def start(self) -> None:
        if self._stepper is None:
            self._stepper = asyncio.get_running_loop().create_task(self._step_loop(), name="sim-decode-steps")
        await self._start_events()

    async def stop(self) -> None:
        """Abort every request still in the engine (their streams end with "abort"), then stop."""
        for rid in list(self._aborts):
            await self.abort(rid)
        if self._stepper is not None:
            self._stepper.cancel()
            await asyncio.gather(self._stepper, return_exceptions=True)
            self._stepper = None
        await self._stop_events()
        self.reader.close()

    async def abort(self, request_id: str) -> None:
        ev = self._aborts.get(request_id)
        if ev is not None:
            ev.set()
        seq = self._running.get(request_id)
        if seq is not None:
            seq.changed.set()

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running), waiting=self._waiting,
                           free_kv_blocks=self.blocks.free_blocks, kv_bytes_moved=self.kv_bytes_moved,
                           extra={k: float(v) for k, v in self.counters.items()})

    # --- one request -------------------------------------------------------------------------------
    async def stream(self, done: PrefillDone) -> AsyncIterator[TokenDelta]:
        rid = done.request_id
        if self._stepper is None:
            raise EngineError("the simulated decode engine is not started")
        if rid in self._aborts:
            raise EngineError(f"request {rid!r} is already decoding")
        abort = self._aborts[rid] = asyncio.Event()
        try:
            await self._admit(done)
            try:
                cached = await self._blocks_for(done)
                loaded, recomputed = await self._import(done, cached, abort)
                first = {"kv_loaded_tokens": loaded, "kv_recomputed": recomputed}
                async for delta in self._generate(done, abort, done.first_token_id, 1, first):
                    yield delta
            finally:
                self.blocks.free(rid)
                self._freed.set()
                self._slots.release()
        finally:
            self._aborts.pop(rid, None)

    async def stream_local(self, task: PrefillTask) -> AsyncIterator[TokenDelta]:
        """The whole request here: prefill the uncached part of the prompt, then decode (module doc)."""
        rid, prompt = task.request_id, task.prompt_token_ids
        if self._stepper is None:
            raise EngineError("the simulated decode engine is not started")
        if rid in self._aborts:
            raise EngineError(f"request {rid!r} is already decoding")
        abort = self._aborts[rid] = asyncio.Event()
        try:
            await self._admit(task)
            try:
                cached = min(await self._blocks_for(task), len(prompt) - 1)
                need = len(prompt) - cached
                self.counters["local_prefills"] += 1
                self.counters["local_computed_tokens"] += need
                if cached:
                    self.counters["prefix_hits"] += 1
                if await self._sleep(self.cost.prefill_s(need, cached), abort):
                    yield TokenDelta(token_ids=[], text="", finish_reason="abort", cached_tokens=cached)
                    return
                first_token = sim_tokens(prompt, 1)[0]
                async for delta in self._generate(task, abort, first_token, 0, {"cached_tokens": cached}):
                    yield delta
            finally:
                self.blocks.free(rid)
                self._freed.set()
                self._slots.release()
        finally:
            self._aborts.pop(rid, None)

    def _wait_s(self, done: PrefillDone | PrefillTask) -> float:
        if done.deadline_ms <= 0:
            return NO_DEADLINE_WAIT_S
        return max(0.001, (done.deadline_ms - now_ms()) / 1000.0)

    async def _admit(self, done: PrefillDone | PrefillTask) -> None:
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self._wait_s(done))
        except asyncio.TimeoutError:
            raise EngineError("no decode slot freed before the request's deadline") from None
        finally:
            self._waiting -= 1

    async def _blocks_for(self, done: PrefillDone | PrefillTask) -> int:
        """KV blocks for prompt and output (waiting for others to free some); the cached tokens."""
        prompt = done.prompt_token_ids
        total = len(prompt) + done.sampling.max_tokens
        if -(-total // self.block_size) > self.blocks.num_blocks:
            raise EngineError(f"{total} tokens do not fit this engine's {self.blocks.num_blocks} KV blocks")
        hashes = self.hashes(prompt, done.tenant)
        loop = asyncio.get_running_loop()
        until = loop.time() + self._wait_s(done)
        while True:
            try:
                return min(self.blocks.allocate(done.request_id, hashes, total), len(prompt))
            except BlocksFull:
                self._freed.clear()
                try:
                    await asyncio.wait_for(self._freed.wait(), max(0.0, until - loop.time()))
                except asyncio.TimeoutError:
                    raise EngineError("the KV cache stayed full until the request's deadline") from None

    async def _import(self, done: PrefillDone, cached: int, abort: asyncio.Event) -> tuple[int, bool]:
        """Fetch the prompt's KV from the exporter, or recompute it: (tokens loaded, recomputed)."""
        prompt = done.prompt_token_ids
        need = len(prompt) - cached
        if cached:
            self.counters["prefix_hits"] += 1
        if need <= 0:
            return 0, False
        try:
            self._check(done.kv)
            nbytes = self.cost.kv_bytes(need)
            real = self.cost.kv_transfer_s(nbytes) * self.time_scale
            if real > self.transfer_timeout_s:
                await asyncio.sleep(self.transfer_timeout_s)
                raise TransferTimeout(f"{nbytes} bytes take longer than {self.transfer_timeout_s} s")
            if await self._sleep(self.cost.kv_transfer_s(nbytes), abort):
                return 0, False
            pages = self.reader.read(done.kv)
            if pages != kv_pages(prompt, self.block_size, self.root(done.tenant)):
                raise ChecksumMismatch("the exported pages are not this prompt's KV")
        except KVTransferError as exc:
            log.warning("sim_kv_import_failed", request_id=done.request_id, error=repr(exc))
            self.counters["recomputed"] += 1
            await self._sleep(self.cost.prefill_s(need, cached), abort)
            return 0, True
        self.counters["imported"] += 1
        self.kv_bytes_moved += nbytes
        return need, False

    def _check(self, kv: KVDescriptor) -> None:
        if kv.backend != "shm" or kv.host != self.host:
            raise PeerGone(f"a simulated engine reads shm on {self.host!r}, not {kv.backend} on {kv.host!r}")
        if kv.layout != self.info.layout:
            raise LayoutMismatch(f"exported layout {kv.layout.to_mapping()} is not the simulated one")
        if now_ms() >= kv.lease_expires_ms:
            raise LeaseExpired(f"lease of ticket {kv.ticket} expired at {kv.lease_expires_ms}")

    async def _generate(self, done: PrefillDone | PrefillTask, abort: asyncio.Event, first_token: int,
                        sent: int, first: dict) -> AsyncIterator[TokenDelta]:
        """Tokens ``sent:`` of the output (the first came from prefill when ``sent`` is 1);
        ``first``: extra fields of the first delta."""
        rid, max_tokens = done.request_id, done.sampling.max_tokens
        seq = _Seq(tokens=[first_token] + sim_tokens(done.prompt_token_ids, max_tokens)[1:])
        self._running[rid] = seq
        self._work.set()
        stall = STALL_S + 10 * self.cost.decode_step_s(1) * self.time_scale
        try:
            while True:
                if abort.is_set():
                    yield TokenDelta(token_ids=[], text="", finish_reason="abort", **first)
                    return
                if seq.produced > sent or sent >= max_tokens:
                    new = seq.tokens[sent:seq.produced]
                    sent = seq.produced
                    finish = "length" if sent >= max_tokens else None
                    yield TokenDelta(token_ids=new, text=token_text(new), finish_reason=finish, **first)
                    first = {}
                    if finish:
                        return
                    continue
                seq.changed.clear()
                try:
                    await asyncio.wait_for(seq.changed.wait(), stall)
                except asyncio.TimeoutError:
                    raise EngineError(f"no token for {stall:.0f} s") from None
        finally:
            self._running.pop(rid, None)

    async def _step_loop(self) -> None:
        """Advance every unfinished sequence by one token per modelled decode step."""
        while True:
            batch = [s for s in self._running.values() if s.produced < len(s.tokens)]
            if not batch:
                self._work.clear()
                await self._work.wait()
                continue
            await self._sleep(self.cost.decode_step_s(len(batch)))
            for s in batch:
                if s.produced < len(s.tokens):
                    s.produced += 1
                    s.changed.set()
            self.counters["steps"] += 1
