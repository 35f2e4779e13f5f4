"""``VllmPrefillEngine``: vLLM computes a prompt's KV and first token; kvrelay exports the KV.

Per request: allocate ``ceil(n / block_size)`` export-region blocks under a fresh ticket
(``RegionFull`` -> ``ExportFull``: push back), run vLLM with ``max_tokens=1`` and the request's
sampling, and await the connector's export notice. vLLM's own blocks are freed one engine step
after the prefill; the region blocks stay held under the lease until ``release(ticket)`` (a
decode worker is done with them) or ``expire_leases``.

Finished during prefill (EOS, stop string, the user's max_tokens == 1, abort): the region
blocks are freed and the output carries ``finish_reason`` and no KV.

Transfer backends (``prefill.backends``, in order of preference): "shm" (decode workers on this
host map the region) and "tcp" (a ``BlockServer`` on ``prefill.tcp_host:tcp_port`` serves the
region to any host; started with the engine). Descriptors name the first as ``backend`` and the
others as ``fallbacks``, with the server's ``endpoint``; the decode side picks (``transport.kv.fetch``).

A lease whose export notice is late (timeout, cancellation) is kept as an *orphan* until the
notice arrives or the lease ends, so the connector never writes blocks already given to
another request. Orphans are bounded by the region.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import secrets
import socket
import time
from pathlib import Path

from kvrelay.base.ids import now_ms
from kvrelay.base.logs import bound, get_logger
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.schemas.messages import KVDescriptor, KVLayout, PrefillTask
from kvrelay.transport.errors import RegionFull
from kvrelay.transport.kv.base import host_identity
from kvrelay.transport.kv.leases import LeaseTable
from kvrelay.transport.kv.region import ExportRegion, blocks_for_bytes, new_region_name
from kvrelay.transport.kv.tcp_server import BlockServer, BlockServerConfig
from kvrelay.workers.config import EngineConfig, PrefillConfig
from kvrelay.workers.engine import EngineInfo, EngineStats, PrefillOutput
from kvrelay.workers.errors import EngineDead, EngineError, ExportFull
from kvrelay.workers.vllm_engine.vllm_events import KvEventsMixin, cache_salt
from kvrelay.workers.vllm_engine.params import EXPORT_KEY, ConnectorConfig, Notice
from kvrelay.workers.vllm_engine.runtime import VllmRuntime, sampling_params, translate

log = get_logger(__name__)

SERVED = ("shm", "tcp")  # what a CPU export region can be served by


class VllmPrefillEngine(KvEventsMixin):
    def __init__(
        self,
        engine: EngineConfig,
        prefill: PrefillConfig,
        cache: CacheConfig = CacheConfig(),
        *,
        worker_id: str = "",
        region_dir: Path | None = None,
    ) -> None:
        self.cfg = prefill
        self.cache = cache
        self.backends = tuple(b for b in prefill.backends if b in SERVED)
        if not self.backends:
            raise EngineError(f"prefill.backends {prefill.backends} has none of {SERVED} (what it serves)")
        self.worker_id = worker_id or prefill.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.region_name = new_region_name()
        self._region_dir = region_dir
        conn = ConnectorConfig(notify_path="", region=self.region_name, region_dir=str(region_dir or ""))
        self._rt = VllmRuntime(engine, cache.block_size, conn, self._on_notice, chunk_tokens=prefill.chunk_tokens,
                               long_prompt_step_tokens=prefill.long_prompt_step_tokens)
        self.info = EngineInfo(
            model=engine.served_model_name or engine.model,
            block_size=cache.block_size,
            hash_seed=cache.hash_seed,
            layout=None,
            backends=self.backends,
            max_model_len=engine.max_model_len,
        )
        self._host = host_identity()
        self._server: BlockServer | None = None
        self.endpoint = ""
        self._region: ExportRegion | None = None
        self._leases: LeaseTable | None = None
        self._ticket = secrets.randbits(48) + 1
        self._orphans: set[int] = set()
        self.counters: dict[str, float] = dict.fromkeys(
            (
                "exports",
                "export_failures",
                "export_blocks",
                "export_bytes",
                "export_copy_ms",
                "late_notices",
                "finished_in_prefill",
            ),
            0,
        )

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self._rt.start(before_engine=self._make_region)
            if "tcp" in self.backends:
                await self._start_server()
            await self._start_kv_events()
        except BaseException:  # failed or cancelled while starting: the region must not outlive us
            await self._stop_kv_events()
            await self._rt.stop()
            await self._stop_server()
            self._close_region()
            raise
        self.info = dataclasses.replace(self.info, layout=self._rt.layout)

    async def _start_server(self) -> None:
        assert self._region is not None
        cfg = BlockServerConfig(host=self.cfg.tcp_host, port=self.cfg.tcp_port,
                                request_timeout_s=self.cfg.export_timeout_s)
        self._server = BlockServer([self._region], cfg)
        self.endpoint = await self._server.start()

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.close()

    def _make_region(self, layout: KVLayout) -> None:
        n = blocks_for_bytes(layout, self.cfg.export_mb << 20)
        self._region = ExportRegion.create(self.region_name, layout, n, self._region_dir)
        self._leases = LeaseTable(n, on_free=self._region.clear_tickets)
        log.info(
            "export_region_created", region=self.region_name, blocks=n, block_bytes=self._region.block_nbytes
        )

    async def stop(self) -> None:
        try:
            await self._stop_kv_events()
            await self._stop_server()
            await self._rt.stop()
        finally:
            self._close_region()

    def _close_region(self) -> None:
        if self._region is not None:
            self._region.close()
            self._region = None

    # -- requests --------------------------------------------------------------------------
    async def prefill(self, task: PrefillTask) -> PrefillOutput:
        with bound(request_id=task.request_id):
            if task.sampling.max_tokens == 1:  # nothing to decode: no export
                return await self._run(task, ticket=0, blocks=[])
            leases = self._lease_table()
            ticket = self._new_ticket()
            nb = math.ceil(len(task.prompt_token_ids) / self.info.block_size)
            pending_ms = int((self.cfg.export_timeout_s + self.cfg.lease_s) * 1000)
            try:
                blocks = leases.allocate(nb, ticket, now_ms() + pending_ms)
            except RegionFull as exc:
                raise ExportFull(str(exc)) from exc
            try:
                return await self._run(task, ticket, blocks)
            except BaseException:
                self._orphan(ticket)  # a save may be under way: keep the blocks until its notice or expiry
                raise

    async def _run(self, task: PrefillTask, ticket: int, blocks: list[int]) -> PrefillOutput:
        llm = self._rt.engine()
        receiver = self._rt.receiver
        kv = (
            {EXPORT_KEY: {"ticket": ticket, "region_blocks": blocks, "checksum": self.cfg.checksum}}
            if ticket
            else None
        )
        sp = sampling_params(task.sampling, max_tokens=1, kv_params=kv, delta=False)
        notice_fut = receiver.expect(("export", ticket)) if ticket else None
        t0 = time.perf_counter()
        try:
            final = await self._generate(llm, task, sp, ticket)
            prefill_ms = (time.perf_counter() - t0) * 1000
            answer = (final.kv_transfer_params or {}).get(EXPORT_KEY) or {}
            scheduled = bool(answer.get("scheduled"))
            notice = None
            if ticket and scheduled:
                notice = await self._await_export(ticket, notice_fut)
            elif ticket:
                self._lease_table().release(ticket)  # nothing was written
        finally:
            if ticket:
                receiver.forget(("export", ticket))
        comp = final.outputs[0]
        if not comp.token_ids or comp.finish_reason == "abort":
            return self._finished(final, "abort", prefill_ms, ticket if notice else 0)
        if ticket and notice is None and comp.finish_reason == "length":
            raise EngineError(f"the connector did not export the KV: {answer.get('error', 'no answer')}")
        token = comp.token_ids[0]
        if notice is None or comp.finish_reason != "length":
            return self._finished(final, comp.finish_reason or "stop", prefill_ms, ticket if notice else 0)
        desc = self._descriptor(task, ticket, blocks, notice)
        return PrefillOutput(
            first_token_id=token,
            text=comp.text,
            finish_reason=None,
            kv=desc,
            cached_tokens=final.num_cached_tokens or 0,
            prefill_ms=prefill_ms,
        )

    async def _generate(self, llm, task: PrefillTask, sp, ticket: int):
        from vllm.inputs import TokensPrompt

        final = None
        try:
            prompt = TokensPrompt(prompt_token_ids=task.prompt_token_ids)
            if salt := cache_salt(task.tenant):
                prompt["cache_salt"] = salt  # tenants never share vLLM blocks (kv_events.py)
            async for out in llm.generate(prompt, sp, request_id=task.request_id):
                final = out
        except Exception as exc:
            err = translate(exc)
            if ticket and not isinstance(err, EngineDead):
                self._lease_table().release(ticket)  # the request failed before finishing: nothing saved
            raise err from exc
        return final

    async def _await_export(self, ticket: int, fut: asyncio.Future[Notice]) -> Notice:
        try:
            notice = await asyncio.wait_for(fut, self.cfg.export_timeout_s)
        except asyncio.TimeoutError:
            raise EngineError(
                f"export of ticket {ticket} not confirmed in {self.cfg.export_timeout_s} s"
            ) from None
        if not notice.ok:
            self._lease_table().release(ticket)
            raise EngineError(f"export failed ({notice.code}): {notice.error}")
        return notice

    def _finished(self, final, reason: str, prefill_ms: float, ticket: int) -> PrefillOutput:
        if ticket:
            self._lease_table().release(ticket)
        self.counters["finished_in_prefill"] += 1
        comp = final.outputs[0]
        return PrefillOutput(
            first_token_id=comp.token_ids[0] if comp.token_ids else 0,
            text=comp.text,
            finish_reason=reason,
            kv=None,
            cached_tokens=final.num_cached_tokens or 0,
            prefill_ms=prefill_ms,
        )

    def _descriptor(self, task: PrefillTask, ticket: int, blocks: list[int], notice: Notice) -> KVDescriptor:
        expires = now_ms() + int(self.cfg.lease_s * 1000)
        self._lease_table().renew(ticket, expires)
        assert self._region is not None and self._rt.layout is not None
        return KVDescriptor(
            backend=self.backends[0],  # type: ignore[arg-type]
            worker_id=self.worker_id,
            host=self._host,
            region=self._region.name,
            block_ids=blocks,
            num_tokens=len(task.prompt_token_ids),
            ticket=ticket,
            lease_expires_ms=expires,
            layout=self._rt.layout,
            endpoint=self.endpoint,
            checksum=notice.checksum,
            fallbacks=list(self.backends[1:]),
        )

    async def abort(self, request_id: str) -> None:
        await self._rt.abort(request_id)

    async def reset_prefix_cache(self) -> bool:
        """Drop vLLM's prefix cache; False while any vLLM KV block is held (so: True = no leak at idle)."""
        return await self._rt.reset_prefix_cache()

    def release(self, ticket: int) -> bool:
        self._orphans.discard(ticket)
        return self._lease_table().release(ticket)

    def expire_leases(self, now_ms: int) -> int:
        freed = self._lease_table().expire(now_ms)
        self._orphans.difference_update(freed)
        return len(freed)

    def stats(self) -> EngineStats:
        leases = self._leases
        return EngineStats(
            running=self._rt.sched.running,
            waiting=self._rt.sched.waiting,
            free_kv_blocks=self._rt.free_kv_blocks,
            exported_blocks=leases.used_blocks if leases else 0,
            export_free_blocks=leases.free_blocks if leases else 0,
            kv_bytes_moved=int(self.counters["export_bytes"]),
            extra={
                **self.counters,
                **({f"tcp_{k}": float(v) for k, v in self._server.counters.items()} if self._server else {}),
                "leases": leases.active if leases else 0,
                "orphans": len(self._orphans),
                "lease_rejected": leases.rejected_total if leases else 0,
                "lease_expired": leases.expired_total if leases else 0,
            },
        )

    # -- internals -------------------------------------------------------------------------
    def _lease_table(self) -> LeaseTable:
        if self._leases is None:
            raise EngineError("the prefill engine is not started")
        return self._leases

    def _new_ticket(self) -> int:
        self._ticket = self._ticket % ((1 << 62) - 1) + 1
        return self._ticket

    def _orphan(self, ticket: int) -> None:
        leases = self._leases
        if leases is not None and leases.blocks_of(ticket) is not None:
            self._orphans.add(ticket)
            leases.renew(ticket, now_ms() + int((self.cfg.export_timeout_s + self.cfg.lease_s) * 1000))

    def _on_notice(self, notice: Notice, matched: bool) -> None:
        if notice.kind != "export":
            return
        c = self.counters
        if notice.ok:
            c["exports"] += 1
            c["export_blocks"] += notice.blocks
            c["export_bytes"] += notice.nbytes
            c["export_copy_ms"] += notice.ms
        else:
            c["export_failures"] += 1
        if not matched:
            c["late_notices"] += 1
            if notice.ticket in self._orphans:  # the connector is done with these blocks now
                self.release(notice.ticket)
