"""The worker half of ``KVRelayConnector``: moves KV between vLLM's cache and kvrelay's memory.

Runs where vLLM's model runner runs (the EngineCore process with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Per engine step:

- ``start_load``: each new import is submitted to a thread pool (``load_workers`` threads, on the
  cores ``load_cpus`` names when set; the queue holds at most one load per request vLLM keeps
  waiting for remote KV).
- ``save``: each export the scheduler half queued last step is copied now, synchronously,
  into the export region (tickets cleared, blocks copied, tickets set), so vLLM frees its
  blocks one step after the prefill finished.
- ``results``: finished exports -> ``finished_sending``; finished loads -> ``finished_recving``,
  always, also when they failed (vLLM frees a request's blocks only then), with the failed
  loads' blocks returned by ``take_invalid`` so vLLM recomputes them; every outcome is sent to
  the engine as a ``Notice`` (one datagram per step).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from kvrelay.base.logs import get_logger
from kvrelay.schemas.errors import SchemaError
from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import KVTransferError, LayoutMismatch, PeerGone
from kvrelay.transport.kv.base import BlockTarget
from kvrelay.transport.kv.copy import checksum, copy_blocks, zero_blocks
from kvrelay.transport.kv.fetch import KVFetcher
from kvrelay.transport.kv.metrics import encode_skipped
from kvrelay.transport.kv.region import ExportRegion
from kvrelay.workers import cpus
from kvrelay.workers.vllm_engine.layout import block_target
from kvrelay.workers.vllm_engine.notify import NotifySender
from kvrelay.workers.vllm_engine.params import ConnectorConfig, Notice, failed

log = get_logger(__name__)


@dataclass(frozen=True)
class SaveSpec:
    """Copy vLLM blocks ``vllm_blocks`` into region blocks ``region_blocks`` under ``ticket``."""

    req_id: str
    vllm_blocks: list[int]
    region_blocks: list[int]
    ticket: int
    checksum: bool


@dataclass(frozen=True)
class LoadSpec:
    """Load ``kv.block_ids[first_block:]`` into vLLM blocks ``dst_blocks``."""

    req_id: str
    kv: dict  # KVDescriptor mapping (validated again in the load thread)
    first_block: int
    dst_blocks: list[int]
    nonce: int
    debug_zero_kv: bool
    error: str = ""  # set: the scheduler half refuses this load (reported as failed, not attempted)


@dataclass(frozen=True)
class _Loaded:
    notice: Notice
    dst_blocks: list[int]


def _ticket_of(kv: dict) -> int:
    t = kv.get("ticket")
    return t if type(t) is int and 0 <= t < (1 << 63) else 0


class ConnectorWorker:
    def __init__(self, cfg: ConnectorConfig, layout: KVLayout, sender: NotifySender) -> None:
        self._cfg = cfg
        self._layout = layout
        self._sender = sender
        region_dir = Path(cfg.region_dir) if cfg.region_dir else None
        self._region_dir = region_dir
        self._fetcher = KVFetcher.build(cfg.backends, region_dir=region_dir, max_regions=cfg.max_regions)
        # bound to ``load_cpus`` (when set) as each thread starts: see workers/cpus.py
        load_cpus = cpus.parse_cpu_list(cfg.load_cpus, "load_cpus")
        self._pool = cpus.pool(cfg.load_workers, "kvrelay-load", load_cpus)
        self._target: BlockTarget | None = None
        self._region: ExportRegion | None = None
        self._loads: dict[str, Future[_Loaded]] = {}
        self._sent: set[str] = set()
        self._invalid: set[int] = set()
        self._notices: list[Notice] = []

    # -- set-up ----------------------------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Check vLLM's real cache against the layout (fail loudly) and map the export region."""
        self._target = block_target(kv_caches, self._layout)
        if self._cfg.region:
            self._region = ExportRegion.attach(self._cfg.region, self._layout, self._region_dir)
        log.info("kv_caches_registered", blocks=self._target.num_blocks, region=self._cfg.region or None)

    # -- per step --------------------------------------------------------------------------
    def start_load(self, loads: list[LoadSpec]) -> None:
        for spec in loads:
            self._loads[spec.req_id] = self._pool.submit(self._load, spec)

    def save(self, saves: list[SaveSpec]) -> None:
        for spec in saves:
            self._notices.append(self._save(spec))
            self._sent.add(spec.req_id)

    def unpin(self, req_ids: list[str]) -> None:
        """Pinned requests whose blocks vLLM may free now (reported as finished sending)."""
        self._sent.update(req_ids)

    def results(self) -> tuple[set[str], set[str]]:
        """(finished_sending, finished_recving) of this step; sends this step's notices."""
        recving: set[str] = set()
        for req_id in [r for r, f in self._loads.items() if f.done()]:
            loaded = self._loads.pop(req_id).result()  # _load never raises
            self._notices.append(loaded.notice)
            if not loaded.notice.ok:
                self._invalid.update(loaded.dst_blocks)
            recving.add(req_id)
        sending, self._sent = self._sent, set()
        if self._notices:
            notices, self._notices = self._notices, []
            self._sender.send(notices)
        return sending, recving

    def take_invalid(self) -> set[int]:
        invalid, self._invalid = self._invalid, set()
        return invalid

    # -- the copies ------------------------------------------------------------------------
    def _save(self, spec: SaveSpec) -> Notice:
        t0 = time.perf_counter()
        region, target = self._region, self._target
        if region is None or target is None:
            return failed("export", "internal", "this engine has no export region", ticket=spec.ticket)
        try:
            region.clear_tickets(spec.region_blocks)  # readers of a previous owner fail from here on
            nbytes = copy_blocks(target.kv, spec.vllm_blocks, region.data, spec.region_blocks)
            crc = checksum(region.data, spec.region_blocks) if spec.checksum else None
            region.set_tickets(spec.region_blocks, spec.ticket)
        except Exception as exc:  # a failed export is reported; the prefill engine frees the lease
            log.exception("export_failed", ticket=spec.ticket)
            return failed("export", "internal", f"export copy failed: {exc!r}", ticket=spec.ticket)
        ms = (time.perf_counter() - t0) * 1000
        return Notice(
            kind="export",
            ticket=spec.ticket,
            blocks=len(spec.region_blocks),
            nbytes=nbytes,
            ms=ms,
            checksum=crc,
        )

    def _load(self, spec: LoadSpec) -> _Loaded:
        t0 = time.perf_counter()
        try:
            if spec.error:
                raise LayoutMismatch(spec.error)
            if self._target is None:
                raise PeerGone("KV caches are not registered yet")
            desc = KVDescriptor.from_mapping(spec.kv)
            fetched = self._fetcher.read(
                desc,
                self._target,
                spec.dst_blocks,
                first_block=spec.first_block,
                timeout_s=self._cfg.transfer_timeout_s,
            )
            res = fetched.result
            if spec.debug_zero_kv or self._cfg.debug_zero_kv:
                zero_blocks(self._target.kv, spec.dst_blocks)
        except (KVTransferError, SchemaError) as exc:
            code = getattr(exc, "code", "transfer")
            notice = failed("import", code, str(exc), ticket=_ticket_of(spec.kv), nonce=spec.nonce)
            notice = notice.replace(skipped=encode_skipped(getattr(exc, "skipped", ())))
            return _Loaded(notice, spec.dst_blocks)
        except Exception as exc:
            log.exception("import_failed", nonce=spec.nonce)
            notice = failed("import", "internal", repr(exc), ticket=_ticket_of(spec.kv), nonce=spec.nonce)
            return _Loaded(notice, spec.dst_blocks)
        loaded_tokens = desc.num_tokens - spec.first_block * desc.layout.block_size
        notice = Notice(
            kind="import",
            ticket=desc.ticket,
            nonce=spec.nonce,
            blocks=res.blocks,
            nbytes=res.nbytes,
            ms=(time.perf_counter() - t0) * 1000,
            loaded_tokens=loaded_tokens,
            backend=fetched.backend,
            skipped=encode_skipped(fetched.skipped),
        )
        return _Loaded(notice, spec.dst_blocks)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._fetcher.close()
        if self._region is not None:
            self._region.close()
        self._sender.close()
