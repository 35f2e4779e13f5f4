"""``VllmDecodeEngine``: vLLM continues a request whose prompt KV another worker computed.

The prompt submitted is the prefill's prompt plus its first token, with
``max_tokens = sampling.max_tokens - 1``; the connector loads the prompt's KV from the
descriptor (``kvrelay_import``), so vLLM computes only the first token's KV and samples the
second. A structured request's grammar first accepts the first token (``kvrelay_advance``). A failed load is recomputed by vLLM (local prefill fallback); a descriptor this
engine cannot read at all (another host, backend or layout) is not offered to the connector:
vLLM prefills locally from the start. Either way the stream completes and its first delta
says how the KV got there (``kv_loaded_tokens``, ``kv_recomputed``).

The transfer backend is negotiated per request (``transport.kv.fetch``): the decode config's
``backends`` in order (those usable in this process: ``fetch.available``), restricted to what
the descriptor offers (same host for shm/cma). Each import's backend, bytes and time are logged
and counted (``kvrelay_kv_transfer_*``, ``transport.kv.metrics``).

The import is over (loaded, recomputed, or given up) when the first delta is yielded: the
caller may release the prefill worker's lease then.

Local prefill (``stream_local``, decode affinity): the whole prompt is submitted with no
``kv_transfer_params`` and the request's full ``max_tokens``; vLLM's prefix cache (same
``cache_salt`` as the transferred requests) serves the blocks this engine holds, so only the
rest is computed. The first delta carries every token so far and ``cached_tokens`` (vLLM's
``num_cached_tokens``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator
from typing import Any

from kvrelay.base.logs import get_logger
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.schemas.messages import KVDescriptor, PrefillDone, PrefillTask
from kvrelay.transport.kv import metrics as kv_metrics
from kvrelay.transport.kv.base import host_identity
from kvrelay.transport.kv.fetch import available, plan
from kvrelay.transport.kv.region import layout_fingerprint
from kvrelay.workers.config import DecodeConfig, EngineConfig
from kvrelay.workers.engine import EngineInfo, EngineStats, TokenDelta
from kvrelay.workers.errors import EngineError
from kvrelay.workers.local_budget import engine_chunk_tokens
from kvrelay.workers.metrics import KV_PINS
from kvrelay.workers.vllm_engine.vllm_events import KvEventsMixin, cache_salt
from kvrelay.workers.vllm_engine.params import ADVANCE_KEY, IMPORT_KEY, PIN_KEY, ConnectorConfig, Notice
from kvrelay.workers.vllm_engine.runtime import VllmRuntime, sampling_params, translate

log = get_logger(__name__)

NOTICE_WAIT_S = 2.0  # how long the first delta waits for the import notice (it is normally there already)
READABLE_BACKENDS = ("shm", "cma", "tcp", "nixl")  # cuda-ipc reads into GPU caches only


def _pin(session: str, ttl_ms: int) -> dict[str, Any] | None:
    """The connector's pin request of a session's step (ttl 0: not kept, but it ends the last pin)."""
    return {PIN_KEY: {"session": session, "ttl_ms": ttl_ms}} if session else None


def readable_backends(wanted: list[str]) -> tuple[str, ...]:
    """The configured backends this engine can read with here, in the configured order."""
    out = []
    for b in wanted:
        ok, why = available(b) if b in READABLE_BACKENDS else (False, "not for a CPU cache")
        if ok:
            out.append(b)
        else:
            log.info("kv_backend_not_used", backend=b, reason=why)
    return tuple(out)
FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


class VllmDecodeEngine(KvEventsMixin):
    def __init__(self, engine: EngineConfig, decode: DecodeConfig, cache: CacheConfig = CacheConfig(), *,
                 worker_id: str = "") -> None:
        self.cfg = decode
        self.cache = cache
        # debug control, read per request: zero the loaded KV (output must then differ)
        self.debug_zero_kv = decode.debug_zero_kv
        backends = readable_backends(list(decode.backends))
        conn = ConnectorConfig(notify_path="", transfer_timeout_s=decode.transfer_timeout_s,
                               backends=list(backends), load_cpus=decode.kv_load_cpus,
                               pin_budget=decode.kv_pin_budget, pin_max_sessions=decode.kv_pin_max_sessions,
                               pin_max_ttl_ms=int(decode.kv_pin_max_ttl_s * 1000))
        self._rt = VllmRuntime(engine, cache.block_size, conn, self._on_notice,
                               chunk_tokens=engine_chunk_tokens(decode, engine.max_num_seqs))
        self.info = EngineInfo(
            model=engine.served_model_name or engine.model,
            block_size=cache.block_size,
            hash_seed=cache.hash_seed,
            layout=None,
            backends=backends,
            max_model_len=engine.max_model_len,
        )
        self._host = host_identity()
        self.counters: dict[str, float] = dict.fromkeys(
            (
                "imports",
                "import_failures",
                "import_blocks",
                "import_bytes",
                "import_ms",
                "prefix_hits",
                "unreadable",
                "decodes",
                "aborted",
                "local_prefills",
                "local_cached_tokens",
            ),
            0,
        )

    async def start(self) -> None:
        await self._rt.start()
        self.info = dataclasses.replace(self.info, layout=self._rt.layout)
        try:
            await self._start_kv_events()
        except BaseException:
            await self._rt.stop()
            raise

    async def stop(self) -> None:
        await self._stop_kv_events()
        await self._rt.stop()

    def readable(self, kv: KVDescriptor) -> bool:
        """Whether this engine can load ``kv`` at all (else it prefills locally without trying)."""
        return (
            bool(plan(kv, self.info.backends, self._host))
            and self._rt.layout is not None
            and layout_fingerprint(kv.layout) == layout_fingerprint(self._rt.layout)
        )

    async def stream(self, done: PrefillDone) -> AsyncIterator[TokenDelta]:
        # no log context is bound here: a generator's first step may run in another task than its
        # close (decode.py reads the first delta in a task of its own); the callers bind request_id
        max_tokens = done.sampling.max_tokens - 1
        if max_tokens < 1:
            yield TokenDelta(token_ids=[], text="", finish_reason="length")
            return
        nonce = secrets.randbits(62) + 1
        kv_params = None
        if self.readable(done.kv) and done.kv.num_tokens == len(done.prompt_token_ids):
            kv_params = {
                IMPORT_KEY: {
                    "kv": done.kv.to_mapping(),
                    "nonce": nonce,
                    "debug_zero_kv": self.debug_zero_kv,
                }
            }
        else:
            self.counters["unreadable"] += 1
        if done.sampling.structured is not None:  # the grammar continues after the first token
            kv_params = (kv_params or {}) | {ADVANCE_KEY: {"token_ids": [done.first_token_id]}}
        if pin := _pin(done.session, done.kv_ttl_ms):
            kv_params = (kv_params or {}) | pin
        async for delta in self._stream(done, max_tokens, kv_params, nonce):
            yield delta

    async def stream_local(self, task: PrefillTask) -> AsyncIterator[TokenDelta]:
        """The whole request on this engine: no KV transfer, the prefix cache serves what it holds."""
        from vllm.inputs import TokensPrompt

        spec = task.sampling
        sp = sampling_params(spec, max_tokens=spec.max_tokens, kv_params=_pin(task.session, task.kv_ttl_ms),
                             delta=True)
        prompt = TokensPrompt(prompt_token_ids=list(task.prompt_token_ids))
        if salt := cache_salt(task.tenant):
            prompt["cache_salt"] = salt  # the same salt as transferred requests: their blocks hit
        self.counters["local_prefills"] += 1
        first, outputs = True, self._outputs(prompt, sp, task.request_id)
        try:
            async for delta, out in outputs:
                if first:
                    first = False
                    cached = min(int(out.num_cached_tokens or 0), len(task.prompt_token_ids))
                    self.counters["local_cached_tokens"] += cached
                    delta = dataclasses.replace(delta, cached_tokens=cached)
                yield delta
        finally:
            await outputs.aclose()  # a closed stream aborts the vLLM request now, not at GC

    async def _stream(
        self, done: PrefillDone, max_tokens: int, kv_params: dict | None, nonce: int
    ) -> AsyncIterator[TokenDelta]:
        from vllm.inputs import TokensPrompt

        receiver = self._rt.receiver
        key = ("import", nonce)
        fut = receiver.expect(key) if kv_params and IMPORT_KEY in kv_params else None
        sp = sampling_params(done.sampling, max_tokens=max_tokens, kv_params=kv_params, delta=True)
        prompt = TokensPrompt(prompt_token_ids=[*done.prompt_token_ids, done.first_token_id])
        if salt := cache_salt(done.tenant):
            prompt["cache_salt"] = salt  # tenants never share vLLM blocks (vllm_events.py)
        self.counters["decodes"] += 1
        first, outputs = True, self._outputs(prompt, sp, done.request_id)
        try:
            async for delta, _ in outputs:
                if first:
                    first = False
                    delta = await self._first(delta, fut)
                yield delta
        finally:
            await outputs.aclose()  # a closed stream aborts the vLLM request now, not at GC
            if receiver is not None:
                receiver.forget(key)

    async def _outputs(self, prompt: Any, sp: Any, request_id: str) -> AsyncIterator[tuple[TokenDelta, Any]]:
        """vLLM's outputs of one request as deltas (with the raw output); aborted if not finished."""
        gen = self._rt.engine().generate(prompt, sp, request_id=request_id)
        finished = False
        try:
            while not finished:
                try:
                    out = await gen.__anext__()
                except StopAsyncIteration:
                    raise EngineError("vLLM ended the stream without finishing it") from None
                except Exception as exc:
                    raise translate(exc) from exc
                comp = out.outputs[0]
                finished = out.finished
                reason = None
                if finished:
                    if comp.finish_reason not in FINISH:
                        raise EngineError(f"vLLM finished with {comp.finish_reason!r}")
                    reason = FINISH[comp.finish_reason]
                yield TokenDelta(token_ids=list(comp.token_ids), text=comp.text, finish_reason=reason), out
        finally:
            if not finished:
                self.counters["aborted"] += 1
            await gen.aclose()  # aborts the vLLM request unless it finished

    async def _first(self, delta: TokenDelta, fut: asyncio.Future[Notice] | None) -> TokenDelta:
        if fut is None:
            return dataclasses.replace(delta, kv_recomputed=True)
        try:
            notice = await asyncio.wait_for(asyncio.shield(fut), NOTICE_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("import_notice_missing")
            return delta
        if not notice.ok:
            log.warning("kv_import_failed", code=notice.code, error=notice.error)
            return dataclasses.replace(delta, kv_recomputed=True)
        return dataclasses.replace(delta, kv_loaded_tokens=notice.loaded_tokens)

    async def abort(self, request_id: str) -> None:
        await self._rt.abort(request_id)

    async def reset_prefix_cache(self) -> bool:
        """Drop vLLM's prefix cache; False while any vLLM KV block is held (so: True = no leak at idle)."""
        return await self._rt.reset_prefix_cache()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self._rt.sched.running,
            waiting=self._rt.sched.waiting,
            free_kv_blocks=self._rt.free_kv_blocks,
            kv_bytes_moved=int(self.counters["import_bytes"]),
            extra=dict(self.counters),
        )

    def _on_notice(self, notice: Notice, matched: bool) -> None:
        if notice.kind == "pin":
            key = f"pins_{notice.code}"
            self.counters[key] = self.counters.get(key, 0) + 1
            KV_PINS.labels(notice.code).inc()
            return
        if notice.kind != "import":
            return
        c = self.counters
        skipped = kv_metrics.decode_skipped(notice.skipped)
        if not notice.ok:
            c["import_failures"] += 1
            kv_metrics.record_failure(notice.code, skipped)
            log.info("kv_transfer_failed", code=notice.code, skipped=notice.skipped, error=notice.error[:300])
        elif notice.blocks:
            c["imports"] += 1
            c["import_blocks"] += notice.blocks
            c["import_bytes"] += notice.nbytes
            c["import_ms"] += notice.ms
            c[f"imports_{notice.backend}"] = c.get(f"imports_{notice.backend}", 0) + 1
            kv_metrics.record(notice.backend, notice.nbytes, notice.ms / 1000, skipped)
            log.info("kv_transfer", backend=notice.backend, blocks=notice.blocks, nbytes=notice.nbytes,
                     ms=round(notice.ms, 3), skipped=notice.skipped or None)
        else:
            c["prefix_hits"] += 1
