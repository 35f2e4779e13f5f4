"""The cross-memory-attach KV reader: ``process_vm_readv`` from the exporter's own mapping.

Same host, ``shm`` descriptors: instead of mapping the region, the reader learns the owner's pid
and mapping address from the region's first page (``region.OWNER_MAP_AT``) and copies blocks
straight out of the owner's address space, many runs per system call (``IOV_MAX`` iovecs a
side), the way UCX's cma transport does. The tickets are read the same way before and after
the copy (the seqlock of ``region.py``); before first use the owner's header is read through
``process_vm_readv`` and compared with the file's, so a recycled pid is never read from.

Linux allows it when the reader may ptrace the owner: same uid (or CAP_SYS_PTRACE) and
``/proc/sys/kernel/yama/ptrace_scope`` at 0 (1 needs a ptracer relationship, which kvrelay
workers do not have). ``cma_permitted()`` says what this host allows; a refused read (EPERM)
raises ``PeerGone`` with ``code = "cma_denied"`` so the caller falls back to the mapped
``shm`` reader and says so (``fetch.py``).

Measured here (``loadtest/results/transfer_cpu.json``), ``process_vm_readv`` copies at about
half the speed of a mapped ``memcpy`` (the kernel pins and copies page by page), so ``shm``
stays the first choice and ``cma`` is the option for readers that cannot map the region.

Peers are cached by region name, at most ``max_regions`` (least recently used dropped first).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvrelay.schemas.messages import KVDescriptor
from kvrelay.transport.errors import ChecksumMismatch, LeaseExpired, PeerGone, TransferTimeout
from kvrelay.transport.kv.base import (
    BlockTarget,
    KVReader,
    ReadResult,
    check_read,
    check_src_ids,
    host_identity,
    page_spans,
)
from kvrelay.transport.kv.copy import block_runs
from kvrelay.transport.kv.region import (
    HEADER_BYTES,
    ExportRegion,
    block_nbytes,
    check_region_name,
    default_dir,
    parse_header,
)

IOV_MAX = 1024
CHUNK_BYTES = 64 << 20  # bytes per system call batch, between deadline checks
YAMA = Path("/proc/sys/kernel/yama/ptrace_scope")


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_readv = getattr(_libc, "process_vm_readv", None)
if _readv is not None:
    _readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec),
                       ctypes.c_ulong, ctypes.c_ulong]
    _readv.restype = ctypes.c_ssize_t


class CmaDenied(PeerGone):
    """The kernel refused ``process_vm_readv`` (ptrace rules): use the mapped ``shm`` reader."""

    code = "cma_denied"


def cma_permitted() -> tuple[bool, str]:
    """Whether this host lets a process read a same-uid peer's memory, and why not."""
    if _readv is None:
        return False, "libc has no process_vm_readv (not Linux)"
    try:
        scope = int(YAMA.read_text().strip())
    except FileNotFoundError:
        return True, "no Yama LSM: same uid is enough"
    except (OSError, ValueError) as exc:
        return False, f"cannot read {YAMA}: {exc}"
    if scope == 0:
        return True, "yama ptrace_scope 0"
    return False, f"yama ptrace_scope is {scope}: only a ptracer ancestor may read a peer's memory"


def vm_read(pid: int, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]]) -> int:
    """One ``process_vm_readv`` call: (address, bytes) spans, at most ``IOV_MAX`` per side."""
    assert _readv is not None
    loc = (_Iovec * len(local))(*(_Iovec(a, n) for a, n in local))
    rem = (_Iovec * len(remote))(*(_Iovec(a, n) for a, n in remote))
    got = _readv(pid, loc, len(local), rem, len(remote), 0)
    if got < 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise CmaDenied(f"process_vm_readv from pid {pid} not permitted: {cma_permitted()[1]}")
        if err == errno.ESRCH:
            raise PeerGone(f"the exporting process {pid} is gone")
        raise PeerGone(f"process_vm_readv from pid {pid}: {os.strerror(err)}")
    return got


def _batches(local: list[tuple[int, int]], remote: list[tuple[int, int]]):
    """Split two span lists covering the same bytes into aligned batches (<= IOV_MAX and CHUNK_BYTES)."""
    li = ri = 0
    loff = roff = 0
    while li < len(local):
        lb: list[tuple[int, int]] = []
        rb: list[tuple[int, int]] = []
        size = 0
        while li < len(local) and len(lb) < IOV_MAX and size < CHUNK_BYTES:
            a, n = local[li]
            take = min(n - loff, CHUNK_BYTES - size)
            lb.append((a + loff, take))
            size += take
            loff += take
            if loff == n:
                li, loff = li + 1, 0
        need = size
        while need:
            if len(rb) == IOV_MAX:  # remote side full: trim the local side to what fits
                break
            a, n = remote[ri]
            take = min(n - roff, need)
            rb.append((a + roff, take))
            need -= take
            roff += take
            if roff == n:
                ri, roff = ri + 1, 0
        if need:  # give the unmatched local bytes back
            li, loff = _rewind(local, li, loff, need)
            lb = _trim(lb, need)
        yield lb, rb


def _rewind(spans: list[tuple[int, int]], i: int, off: int, back: int) -> tuple[int, int]:
    while back:
        if off == 0:
            i -= 1
            off = spans[i][1]
        step = min(off, back)
        off -= step
        back -= step
    return i, off


def _trim(spans: list[tuple[int, int]], cut: int) -> list[tuple[int, int]]:
    out = list(spans)
    while cut:
        a, n = out.pop()
        if n > cut:
            out.append((a, n - cut))
            cut = 0
        else:
            cut -= n
    return out


@dataclass(frozen=True)
class _Peer:
    pid: int
    base: int  # address of the owner's mapping of the region (offset 0)
    num_blocks: int
    data_offset: int
    block_bytes: int

    def block_addr(self, block: int) -> int:
        return self.base + self.data_offset + block * self.block_bytes


class CmaReader(KVReader):
    backend = "cma"

    def __init__(self, directory: Path | None = None, max_regions: int = 8, host: str | None = None) -> None:
        if max_regions < 1:
            raise ValueError("max_regions must be >= 1")
        self._dir = directory or default_dir()
        self._max = max_regions
        self._host = host or host_identity()
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
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
        src = check_read(desc, target, len(dst_block_ids), first_block, "shm", "cma", host=self._host)
        peer = self._peer(desc)
        check_src_ids(desc, peer.num_blocks)
        if not self._tickets_match(peer, src, desc.ticket):
            raise LeaseExpired(f"ticket {desc.ticket} no longer holds its blocks")
        whole = len(src) == len(desc.block_ids)
        if desc.checksum is not None and not whole:
            self._verify_remote(peer, desc)
        remote = [(peer.block_addr(s), k * peer.block_bytes) for s, _, k in block_runs(src, src)]
        local = page_spans(target, dst_block_ids)
        nbytes = 0
        for lb, rb in _batches(local, remote):
            if time.monotonic() > deadline:
                raise TransferTimeout(f"cma read of {len(src)} blocks passed {timeout_s} s")
            want = sum(n for _, n in lb)
            got = vm_read(peer.pid, lb, rb)
            if got != want:
                raise PeerGone(f"process_vm_readv read {got} of {want} bytes (the owner's mapping changed)")
            nbytes += got
        if not self._tickets_match(peer, src, desc.ticket):
            raise LeaseExpired(f"ticket {desc.ticket} lost its blocks during the read")
        if desc.checksum is not None and whole:
            crc = 0
            for a, n in local:
                crc = zlib.crc32((ctypes.c_char * n).from_address(a), crc)
            if crc != desc.checksum:
                raise ChecksumMismatch(f"crc32 {crc:#010x} != exported {desc.checksum:#010x}")
        return ReadResult(blocks=len(src), nbytes=nbytes, seconds=time.monotonic() - t0)

    def _tickets_match(self, peer: _Peer, blocks: list[int], ticket: int) -> bool:
        n = peer.num_blocks
        tickets = (ctypes.c_int64 * n)()
        want = 8 * n
        if vm_read(peer.pid, [(ctypes.addressof(tickets), want)], [(peer.base + HEADER_BYTES, want)]) != want:
            raise PeerGone("cannot read the exporter's tickets")
        return all(tickets[b] == ticket for b in blocks)

    def _verify_remote(self, peer: _Peer, desc: KVDescriptor) -> None:
        """crc32 of the whole export, read from the owner in chunks (partial reads with a checksum)."""
        crc = 0
        buf = ctypes.create_string_buffer(CHUNK_BYTES)
        for s, _, k in block_runs(desc.block_ids, desc.block_ids):
            at, left = peer.block_addr(s), k * peer.block_bytes
            while left:
                n = min(left, CHUNK_BYTES)
                if vm_read(peer.pid, [(ctypes.addressof(buf), n)], [(at, n)]) != n:
                    raise PeerGone("cannot read the exporter's blocks")
                crc = zlib.crc32(memoryview(buf)[:n], crc)
                at, left = at + n, left - n
        if not self._tickets_match(peer, desc.block_ids, desc.ticket):
            raise LeaseExpired(f"ticket {desc.ticket} lost its blocks during the read")
        if crc != desc.checksum:
            raise ChecksumMismatch(f"crc32 {crc:#010x} != exported {desc.checksum:#010x}")

    def _peer(self, desc: KVDescriptor) -> _Peer:
        with self._lock:
            peer = self._peers.get(desc.region)
            if peer is not None:
                self._peers.move_to_end(desc.region)
                return peer
        peer = self._open(desc)
        with self._lock:
            self._peers[desc.region] = peer
            while len(self._peers) > self._max:
                self._peers.popitem(last=False)
        return peer

    def _open(self, desc: KVDescriptor) -> _Peer:
        if _readv is None:
            raise CmaDenied("process_vm_readv is not available here")
        check_region_name(desc.region)
        path = self._dir / desc.region
        try:
            with open(path, "rb") as f:
                header = f.read(HEADER_BYTES)
        except OSError as exc:
            raise PeerGone(f"export region {desc.region!r} is gone: {exc.strerror}") from exc
        num_blocks, data_offset, _ = parse_header(header, desc.region, desc.layout)
        owner = ExportRegion.read_owner_map(header)
        if owner is None:
            raise PeerGone(f"region {desc.region!r} records no owner mapping")
        pid, base = owner
        remote = ctypes.create_string_buffer(HEADER_BYTES)
        if vm_read(pid, [(ctypes.addressof(remote), HEADER_BYTES)], [(base, HEADER_BYTES)]) != HEADER_BYTES:
            raise PeerGone(f"cannot read region {desc.region!r} in process {pid}")
        if remote.raw != header:
            raise PeerGone(f"process {pid} does not hold region {desc.region!r} (its owner is gone)")
        return _Peer(pid, base, num_blocks, data_offset, block_nbytes(desc.layout))

    def close(self) -> None:
        with self._lock:
            self._peers.clear()
