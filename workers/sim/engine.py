"""Simulated engines: the ``workers.engine`` Protocols with a real block manager, real KV events,
real (small) KV bytes in shared memory, deterministic tokens and timing from a cost model.

Time is real asyncio time: every modelled duration (``workers.sim.cost``) is slept for
``time_scale`` times its length (0: not at all), so 64 simulated workers run on one machine.

- Tokens: the output of a prompt is a pure function of its token ids (``sim_tokens``), so a test
  knows every token a request must produce; generation stops at ``max_tokens``.
- Prefill (``SimPrefillEngine``): one prompt computes at a time (prefill is compute-bound), in
  arrival order; with ``prefill.long_prompt_step_tokens`` > 0 in chunks of at most that many
  tokens instead, the waiting prompts taking turns shortest first (``workers/sim/turns.py``). Its
  blocks come from a ``BlockManager`` (prefix cache hits cut the modelled
  time); the KV pages are then written to a ``SimRegion`` under a ticket leased by a
  ``transport.kv.leases.LeaseTable``, and the engine's blocks stay cached for the next request.
- Decode (``workers.sim.decode.SimDecodeEngine``): imports by reading the region named in the
  descriptor (any process on the host; nothing shared but the descriptor), checks the pages are
  this prompt's, and decodes in steps that advance every running sequence by one token.
- KV events: with a bus (``attach_bus`` before ``start``), every store / eviction of the block
  manager goes out through ``transport.kv_events.KvEventPublisher``, and snapshots read
  ``BlockManager.held``.

Block hashes follow the deployment's cache contract (``schemas.hashing.CacheConfig``: block size,
hash seed, tenant salt secret), so workers and router name blocks alike.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from xxhash import xxh64_intdigest

from kvrelay.base.ids import now_ms
from kvrelay.base.logs import get_logger
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.schemas.kv_events import KvEvent
from kvrelay.schemas.messages import KVDescriptor, PrefillTask
from kvrelay.transport.bus import Bus
from kvrelay.transport.errors import RegionFull
from kvrelay.transport.kv.leases import LeaseTable
from kvrelay.transport.kv_event_publisher import KvEventPublisher
from kvrelay.workers.config import EngineConfig, PrefillConfig
from kvrelay.workers.engine import EngineInfo, EngineStats, PrefillOutput
from kvrelay.workers.errors import EngineError, ExportFull
from kvrelay.workers.prefill_queue import schedule_of
from kvrelay.workers.sim.blocks import BlockManager, BlocksFull
from kvrelay.workers.sim.cost import CostModel
from kvrelay.workers.sim.region import SimRegion, kv_pages, sim_layout
from kvrelay.workers.sim.turns import Turns

log = get_logger(__name__)

VOCAB = 49152  # SmolLM2's vocabulary


def sim_tokens(prompt: list[int], n: int) -> list[int]:
    """The first ``n`` output tokens of ``prompt`` (the first comes from prefill)."""
    seed = xxh64_intdigest(struct.pack(f"<{len(prompt)}I", *prompt))
    return [xxh64_intdigest(i.to_bytes(4, "little"), seed) % VOCAB for i in range(n)]


def token_text(token_ids: list[int]) -> str:
    return "".join(f" t{t}" for t in token_ids)


class SimEngineBase:
    """What both simulated engines share: config, cost model, hashing, blocks, KV events."""

    def __init__(self, engine_cfg: EngineConfig, cache: CacheConfig, *, bus: Bus | None = None,
                 worker_id: str = "") -> None:
        self.cfg = engine_cfg
        self.cache = cache
        self.cost = CostModel.preset(engine_cfg.sim_preset)  # UnknownPreset (ValidationError)
        self.time_scale = engine_cfg.sim_time_scale
        self.spec = cache.spec
        bs = self.block_size = cache.block_size
        # 0 blocks configured: as many as the preset's worker holds (its kv_cache_gb of its model)
        num_blocks = engine_cfg.sim_num_blocks or max(1, self.cost.kv_cache_tokens() // bs)
        self.worker_id = worker_id or f"sim-{id(self):x}"
        # without a bus, events wait in the manager's bounded list (take_batch) and past it are dropped
        self.blocks = BlockManager(num_blocks, bs, worker_id=self.worker_id, spec=self.spec.fingerprint,
                                   epoch=time.time_ns(), max_pending_events=4096)
        self.info = EngineInfo(model=engine_cfg.served_model_name or "sim", block_size=bs,
                               hash_seed=cache.hash_seed, layout=sim_layout(bs), backends=("shm",),
                               max_model_len=engine_cfg.max_model_len)
        self.host = socket.gethostname()
        self._bus = bus
        self.events: KvEventPublisher | None = None

    def attach_bus(self, bus: Bus, worker_id: str) -> None:
        """Publish KV events on ``bus`` as ``worker_id`` (call before ``start``)."""
        if self.events is not None:
            raise EngineError("KV events are already being published")
        self._bus, self.worker_id = bus, worker_id
        self.blocks.worker_id = worker_id

    def root(self, tenant: str) -> int:
        """The hash chain root of a tenant's prompts."""
        return self.spec.root(self.cache.salt(tenant))

    def hashes(self, prompt: list[int], tenant: str) -> list[int]:
        return self.spec.hashes(prompt, self.cache.salt(tenant))

    async def _start_events(self) -> None:
        if self._bus is None or self.events is not None:
            return
        self.events = KvEventPublisher(self._bus, self.worker_id, self.spec.fingerprint, self.blocks.held,
                                       epoch=self.blocks.epoch)
        self.blocks.sink = self._publish_event
        await self.events.start()

    async def _stop_events(self) -> None:
        if self.events is not None:
            self.blocks.sink = None
            await self.events.close()
            self.events = None

    def _publish_event(self, ev: KvEvent) -> None:
        assert self.events is not None
        if ev.kind == "stored":
            self.events.stored(ev.block_hashes, parent=ev.parent, num_tokens=ev.num_tokens)
        elif ev.kind == "removed":
            self.events.removed(ev.block_hashes)
        else:
            self.events.cleared()

    async def _sleep(self, modelled_s: float, abort: asyncio.Event | None = None) -> bool:
        """Wait ``modelled_s * time_scale``; True when ``abort`` was set meanwhile."""
        real = modelled_s * self.time_scale
        if abort is None or real <= 0:
            await asyncio.sleep(max(0.0, real))
            return abort is not None and abort.is_set()
        try:
            await asyncio.wait_for(abort.wait(), real)
        except asyncio.TimeoutError:
            return False
        return True


class SimPrefillEngine(SimEngineBase):
    """``PrefillEngine`` (see the module doc). ``prefill_cfg`` sizes the export region and leases."""

    def __init__(self, engine_cfg: EngineConfig, prefill_cfg: PrefillConfig, cache: CacheConfig = CacheConfig(),
                 *, bus: Bus | None = None, worker_id: str = "") -> None:
        super().__init__(engine_cfg, cache, bus=bus, worker_id=worker_id)
        self.lease_ms = int(prefill_cfg.lease_s * 1000)
        block_bytes = self.cost.kv_bytes(self.block_size)  # modelled bytes of one block
        self.leases = LeaseTable(max(1, (prefill_cfg.export_mb << 20) // block_bytes), on_free=self._freed)
        self.region: SimRegion | None = None
        self._compute = asyncio.Lock()  # one prompt at a time, first come first served
        # or one chunk at a time, shortest first (prefill.long_prompt_step_tokens)
        self.step_tokens = prefill_cfg.long_prompt_step_tokens
        self._turns = Turns(schedule_of(prefill_cfg))
        self._aborts: dict[str, asyncio.Event] = {}
        self._waiting = 0
        self._next_ticket = 1
        self.kv_bytes_exported = 0

    async def start(self) -> None:
        if self.region is None:
            self.region = SimRegion.create(self.leases.num_blocks)
        await self._start_events()

    async def stop(self) -> None:
        await self._stop_events()
        if self.region is not None:
            self.region.close()
            self.region = None

    async def prefill(self, task: PrefillTask) -> PrefillOutput:
        if self.region is None:
            raise EngineError("the simulated prefill engine is not started")
        rid, prompt = task.request_id, task.prompt_token_ids
        if rid in self._aborts:
            raise EngineError(f"request {rid!r} is already running")
        abort = self._aborts[rid] = asyncio.Event()
        try:
            hashes = self.hashes(prompt, task.tenant)
            if self.step_tokens:
                cached, seconds, aborted = await self._compute_chunked(rid, prompt, hashes, abort)
            else:
                self._waiting += 1
                try:
                    await self._compute.acquire()
                finally:
                    self._waiting -= 1
                try:
                    cached, seconds, aborted = await self._compute_prompt(rid, prompt, hashes, abort)
                finally:
                    self._compute.release()
            if aborted:
                return PrefillOutput(first_token_id=0, text="", finish_reason="abort", kv=None)
            first = sim_tokens(prompt, 1)[0]
            ms = seconds * 1000.0
            if task.sampling.max_tokens == 1:
                return PrefillOutput(first_token_id=first, text=token_text([first]), finish_reason="length",
                                     kv=None, cached_tokens=cached, prefill_ms=ms)
            kv = self._export(prompt, task.tenant)
            return PrefillOutput(first_token_id=first, text=token_text([first]), finish_reason=None, kv=kv,
                                 cached_tokens=cached, prefill_ms=ms)
        finally:
            self._aborts.pop(rid, None)

    async def _compute_prompt(self, rid: str, prompt: list[int], hashes: list[int],
                              abort: asyncio.Event) -> tuple[int, float, bool]:
        """Hold the prompt's blocks while its modelled prefill time passes: (cached, seconds, aborted)."""
        if abort.is_set():
            return 0, 0.0, True
        try:
            cached = self.blocks.allocate(rid, hashes, len(prompt))
        except BlocksFull as exc:
            raise ExportFull(f"KV cache full: {exc}") from exc
        try:
            seconds = self.cost.prefill_s(len(prompt) - cached, cached)
            aborted = await self._sleep(seconds, abort)
        finally:
            self.blocks.free(rid)  # the blocks stay cached (evictable) for the next request
        return cached, seconds, aborted

    async def _compute_chunked(self, rid: str, prompt: list[int], hashes: list[int],
                               abort: asyncio.Event) -> tuple[int, float, bool]:
        """``_compute_prompt`` a chunk of ``step_tokens`` per turn; blocks are held from the first turn."""
        await self._turn(len(prompt))
        try:
            cached = self.blocks.allocate(rid, hashes, len(prompt))
        except BlocksFull as exc:
            self._turns.release()
            raise ExportFull(f"KV cache full: {exc}") from exc
        done, seconds = cached, 0.0
        try:
            while True:
                n = min(self.step_tokens, len(prompt) - done)
                try:
                    chunk = self.cost.prefill_s(n, done)
                    if await self._sleep(chunk, abort):
                        return cached, seconds, True
                finally:
                    self._turns.release()
                done, seconds = done + n, seconds + chunk
                if done >= len(prompt):
                    return cached, seconds, False
                await self._turn(len(prompt) - done)
        finally:
            self.blocks.free(rid)  # the blocks stay cached (evictable) for the next request

    async def _turn(self, work: int) -> None:
        self._waiting += 1
        try:
            await self._turns.acquire(work)
        finally:
            self._waiting -= 1

    def _export(self, prompt: list[int], tenant: str) -> KVDescriptor:
        """Write the prompt's KV pages to the region under a new leased ticket."""
        if self.region is None:
            raise EngineError("the simulated prefill engine was stopped during the prefill")
        bs = self.block_size
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        expires = now_ms() + self.lease_ms
        try:
            blocks = self.leases.allocate(-(-len(prompt) // bs), ticket, expires)
        except RegionFull as exc:
            raise ExportFull(str(exc)) from exc
        self.region.write(blocks, kv_pages(prompt, bs, self.root(tenant)), ticket)
        self.kv_bytes_exported += self.cost.kv_bytes(len(prompt))
        return KVDescriptor(backend="shm", worker_id=self.worker_id, host=self.host, region=self.region.name,
                            block_ids=blocks, num_tokens=len(prompt), ticket=ticket, lease_expires_ms=expires,
                            layout=self.info.layout)  # type: ignore[arg-type]

    def _freed(self, blocks: list[int]) -> None:
        if self.region is not None:
            self.region.set_tickets(blocks, 0)  # a late reader sees its lease gone

    async def abort(self, request_id: str) -> None:
        ev = self._aborts.get(request_id)
        if ev is not None:
            ev.set()

    def release(self, ticket: int) -> bool:
        return self.leases.release(ticket)

    def expire_leases(self, now_ms: int) -> int:
        return len(self.leases.expire(now_ms))

    def stats(self) -> EngineStats:
        c = self.blocks.counters
        return EngineStats(
            running=int(self._compute.locked() or self._turns.locked()), waiting=self._waiting,
            free_kv_blocks=self.blocks.free_blocks,
            exported_blocks=self.leases.used_blocks, export_free_blocks=self.leases.free_blocks,
            kv_bytes_moved=self.kv_bytes_exported,
            extra={"cached_blocks": float(self.blocks.num_cached), "hit_blocks": float(c["hit_blocks"]),
                   "evicted_blocks": float(c["evicted_blocks"])},
        )
