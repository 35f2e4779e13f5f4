"""The shared-memory KV reader: same-host transfers straight out of the exporter's region.

Reads are a seqlock check around a memory copy: the blocks' tickets must equal the
descriptor's ticket before and after the copy, else the lease ran out or the blocks were
reused meanwhile (``LeaseExpired``). With ``desc.checksum`` set, the crc32 of the exported
bytes is verified before copying (``ChecksumMismatch``).

The copy is one ``copy_`` per run of consecutive blocks (both sides), at memory-copy speed:
the region is mapped with ``MAP_POPULATE`` (no page faults on the first read) and the deadline
is checked between chunks of ``CHUNK_BYTES``. This is the fastest same-host path measured here
(``loadtest/results/transfer_cpu.json``): a single copy from the exporter's shared pages, faster
than ``process_vm_readv`` (``cma.py``) on this kernel.

Attached regions are cached by name, at most ``max_regions`` (least recently used is dropped
first); a region whose file is gone is dropped and reported as ``PeerGone``. A dropped region
is unmapped when the last read still using it finishes (the mapping lives as long as its views).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from kvrelay.schemas.messages import KVDescriptor
from kvrelay.transport.errors import ChecksumMismatch, LayoutMismatch, LeaseExpired, PeerGone, TransferTimeout
from kvrelay.transport.kv.base import (
    BlockTarget,
    KVReader,
    ReadResult,
    check_read,
    check_src_ids,
    host_identity,
)
from kvrelay.transport.kv.copy import checksum, copy_blocks
from kvrelay.transport.kv.region import ExportRegion, default_dir

CHUNK_BYTES = 64 << 20  # bytes copied between deadline checks


class ShmReader(KVReader):
    backend = "shm"

    def __init__(self, directory: Path | None = None, max_regions: int = 8, host: str | None = None) -> None:
        if max_regions < 1:
            raise ValueError("max_regions must be >= 1")
        self._dir = directory or default_dir()
        self._max = max_regions
        self._host = host or host_identity()
        self._regions: OrderedDict[str, ExportRegion] = OrderedDict()
        self._lock = threading.Lock()

    def read(
        self,
        desc: KVDescriptor,
        target: BlockTarget,
        dst_block_ids: Sequence[int],
        *,
        first_block: int = 0,
        timeout_s: float,
    ) -> ReadResult:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        src = check_read(desc, target, len(dst_block_ids), first_block, "shm", host=self._host)
        region = self._region(desc)
        check_src_ids(desc, region.num_blocks)
        if not region.tickets_match(src, desc.ticket):
            raise LeaseExpired(f"ticket {desc.ticket} no longer holds its blocks")
        if desc.checksum is not None:
            self._verify(region, desc)
        nbytes = 0
        step = max(1, CHUNK_BYTES // region.block_nbytes)
        for i in range(0, len(src), step):
            if time.monotonic() > deadline:
                raise TransferTimeout(f"shm read of {len(src)} blocks passed {timeout_s} s")
            nbytes += copy_blocks(region.data, src[i : i + step], target.kv, dst_block_ids[i : i + step])
        if not region.tickets_match(src, desc.ticket):
            raise LeaseExpired(f"ticket {desc.ticket} lost its blocks during the read")
        return ReadResult(blocks=len(src), nbytes=nbytes, seconds=time.monotonic() - t0)

    def _verify(self, region: ExportRegion, desc: KVDescriptor) -> None:
        crc = checksum(region.data, desc.block_ids)
        if not region.tickets_match(desc.block_ids, desc.ticket):
            raise LeaseExpired(f"ticket {desc.ticket} lost its blocks during the read")
        if crc != desc.checksum:
            raise ChecksumMismatch(f"crc32 {crc:#010x} != exported {desc.checksum:#010x}")

    def _region(self, desc: KVDescriptor) -> ExportRegion:
        with self._lock:
            region = self._regions.get(desc.region)
            if region is not None:
                if os.path.exists(region.path):
                    self._regions.move_to_end(desc.region)
                    if region.layout != desc.layout:
                        raise LayoutMismatch(f"region {desc.region!r} holds another layout")
                    return region
                del self._regions[desc.region]
                raise PeerGone(f"export region {desc.region!r} is gone")
            region = ExportRegion.attach(desc.region, desc.layout, self._dir)
            self._regions[desc.region] = region
            while len(self._regions) > self._max:
                self._regions.popitem(last=False)
            return region

    def close(self) -> None:
        with self._lock:
            self._regions.clear()
