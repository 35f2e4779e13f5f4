"""Backend negotiation: which backend a reader uses for a descriptor, and falling through to the next.

The exporter says what it serves: ``desc.backend`` first, then ``desc.fallbacks`` (with
``desc.endpoint`` for tcp). The reader has its own ordered list (``decode.backends``). ``plan``
keeps the reader's order and drops what cannot work for this descriptor:

    shm, cma   the exporter serves "shm" (its export region) and is on this host (``desc.host``)
    tcp        the exporter serves "tcp" and names an endpoint
    cuda-ipc   the exporter serves "cuda-ipc" and is on this host
    nixl       the exporter serves "nixl"

``KVFetcher.read`` tries the planned backends in turn. Only ``PeerGone`` moves on to the next one
(the region cannot be mapped, ptrace is refused (``cma_denied``), the server is unreachable or
busy): the same blocks may be reachable another way. Any other error ends the fetch at once:
a lost lease, a checksum or layout mismatch, or the deadline hold for every path to the same
region, so the caller falls back to recomputing. Every fall-through is logged and returned
(``Fetched.skipped``; on failure the raised error's ``skipped`` attribute), so the process that
serves metrics can count it (``metrics.record``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvrelay.base.logs import get_logger
from kvrelay.schemas.messages import KVDescriptor
from kvrelay.transport.errors import KVTransferError, PeerGone, TransferTimeout
from kvrelay.transport.kv.base import BlockTarget, KVReader, ReadResult, host_identity, offered

log = get_logger(__name__)

BACKENDS = ("shm", "cma", "tcp", "cuda-ipc", "nixl")
SAME_HOST = ("shm", "cma", "cuda-ipc")
# the export a reader reads, where it is not the reader's own name: ``cma`` is a reader only; it
# reads the "shm" export region through the owner's pid instead of mapping it
READS_EXPORT = {"cma": "shm"}


def plan(desc: KVDescriptor, reader_backends: Sequence[str], host: str) -> list[str]:
    """The reader's backends that can read ``desc``, in the reader's order of preference."""
    offers = offered(desc)
    out: list[str] = []
    for b in reader_backends:
        served = READS_EXPORT.get(b, b)
        if b in out or served not in offers:
            continue
        if b in SAME_HOST and desc.host != host:
            continue
        if b == "tcp" and not desc.endpoint:
            continue
        out.append(b)
    return out


def available(backend: str) -> tuple[bool, str]:
    """Whether a reader for ``backend`` can work in this process, and why not."""
    if backend in ("shm", "tcp"):
        return True, ""
    if backend == "cma":
        from kvrelay.transport.kv.cma import cma_permitted

        return cma_permitted()
    if backend == "cuda-ipc":
        from kvrelay.transport.kv.cuda_ipc import cuda_ipc_available

        return cuda_ipc_available()
    if backend == "nixl":
        from kvrelay.transport.kv.nixl import nixl_available

        return nixl_available()
    return False, f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})"


def make_reader(backend: str, *, region_dir: Path | None = None, max_regions: int = 8) -> KVReader:
    """A reader for ``backend`` (the optional ones are imported only here)."""
    if backend == "shm":
        from kvrelay.transport.kv.shm import ShmReader

        return ShmReader(region_dir, max_regions=max_regions)
    if backend == "cma":
        from kvrelay.transport.kv.cma import CmaReader

        return CmaReader(region_dir, max_regions=max_regions)
    if backend == "tcp":
        from kvrelay.transport.kv.tcp import TcpReader

        return TcpReader(max_peers=max_regions)
    if backend == "cuda-ipc":
        from kvrelay.transport.kv.cuda_ipc import CudaIpcReader

        return CudaIpcReader(max_peers=max_regions)
    if backend == "nixl":
        from kvrelay.transport.kv.nixl import NixlReader

        return NixlReader()
    raise ValueError(f"unknown KV transfer backend {backend!r} (known: {', '.join(BACKENDS)})")


@dataclass(frozen=True)
class Fetched:
    backend: str  # the backend that moved the blocks
    result: ReadResult
    skipped: tuple[tuple[str, str], ...] = ()  # (backend, error code) tried first and unusable


class KVFetcher:
    """One reader per usable backend of this process; ``read`` negotiates per descriptor. Thread-safe as its readers."""

    def __init__(
        self, readers: Mapping[str, KVReader], order: Sequence[str], host: str | None = None
    ) -> None:
        self._readers = dict(readers)
        self.order = tuple(b for b in order if b in self._readers)
        self._host = host or host_identity()

    @classmethod
    def build(
        cls, order: Sequence[str], *, region_dir: Path | None = None, max_regions: int = 8
    ) -> KVFetcher:
        """Readers for every backend of ``order`` that works here; the others are logged and left out."""
        readers: dict[str, KVReader] = {}
        for b in order:
            ok, why = available(b)
            if ok:
                readers[b] = make_reader(b, region_dir=region_dir, max_regions=max_regions)
            else:
                log.info("kv_backend_not_available", backend=b, reason=why)
        return cls(readers, order)

    def plan(self, desc: KVDescriptor) -> list[str]:
        return plan(desc, self.order, self._host)

    def read(
        self,
        desc: KVDescriptor,
        target: BlockTarget,
        dst_block_ids: Sequence[int],
        *,
        first_block: int = 0,
        timeout_s: float,
    ) -> Fetched:
        order = self.plan(desc)
        if not order:
            raise PeerGone(
                f"no common backend: the exporter on {desc.host!r} serves {list(offered(desc))}, "
                f"this reader on {self._host!r} reads {list(self.order)}"
            )
        deadline = time.monotonic() + timeout_s
        skipped: list[tuple[str, str]] = []
        last: PeerGone | None = None
        for backend in order:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeout(f"no backend finished within {timeout_s} s (tried {skipped})")
            try:
                res = self._readers[backend].read(
                    desc, target, dst_block_ids, first_block=first_block, timeout_s=left
                )
            except PeerGone as exc:
                skipped.append((backend, exc.code))
                log.info("kv_backend_fallthrough", backend=backend, code=exc.code, error=str(exc)[:300])
                last = exc
                continue
            except KVTransferError as exc:
                exc.skipped = tuple(skipped)  # type: ignore[attr-defined]
                raise
            return Fetched(backend, res, tuple(skipped))
        assert last is not None
        last.skipped = tuple(skipped[:-1])  # type: ignore[attr-defined]
        raise last

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
