"""The cuda-ipc KV backend: GPUs on one node read each other's KV through CUDA IPC memory handles.

Exporter: ``CudaExportRegion`` is the GPU twin of ``region.ExportRegion``: one ``cudaMalloc``
allocation holding ``tickets int64[num_blocks]`` then (512-aligned) ``data [num_blocks,
num_layers, page_elems]``, registered once (``cudaIpcGetMemHandle``) and published as the
descriptor's ``region`` string::

    cuda-ipc:1:<pid>:<device uuid>:<base64 of the 64-byte handle>:<num_blocks>

Tickets follow the seqlock of ``region.py``: the exporter zeroes a block's ticket, writes its
data, synchronises, then sets the ticket; the reader reads the tickets before and after its
copy (device-to-host, a few bytes) and discards the copy when they changed (``LeaseExpired``).

Reader: ``CudaIpcReader`` opens each peer's handle once (``cudaIpcOpenMemHandle``) and keeps it
in an LRU of at most ``max_peers`` open handles (the least recently used is closed with
``cudaIpcCloseMemHandle`` when a new one does not fit); blocks are copied with
``cudaMemcpy2DAsync`` on the reader's own stream, one copy per run of consecutive blocks and
layer (one per run when both sides are block-major), then the stream is polled until done or
the read's timeout (``TransferTimeout``; the stream is then synchronised before the caller may
reuse the destination).

cuda-python (``pip install 'kvrelay[gpu]'``: ``cuda.bindings.runtime``, or ``cuda.cudart`` in
older releases) is imported lazily; without it, or without a GPU, ``cuda_ipc_available()``
says why and nothing here is usable (``NotAvailable``).
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import LayoutMismatch, LeaseExpired, PeerGone, TransferTimeout, TransportError
from kvrelay.transport.kv.base import (
    BlockTarget,
    KVReader,
    ReadResult,
    check_read,
    check_src_ids,
)
from kvrelay.transport.kv.copy import block_runs
from kvrelay.transport.kv.region import block_nbytes, torch_dtype

PREFIX = "cuda-ipc:1:"
ALIGN = 512
POLL_S = (0.00005, 0.001)  # first and longest pause between stream polls


class NotAvailable(TransportError):
    """cuda-python or a CUDA device is missing here."""

    code = "not_available"


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise NotAvailable("cuda-python is not installed (pip install 'kvrelay[gpu]')") from exc
    return cudart


def cuda_ipc_available() -> tuple[bool, str]:
    """Whether cuda-ipc can work in this process, and why not."""
    try:
        cudart = _cudart()
    except NotAvailable as exc:
        return False, str(exc)
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        return False, f"cudaGetDeviceCount: {err}"
    return True, ""


def _check(result: Any, what: str) -> Any:
    """cuda-python returns (err, *values): raise on error, return the value(s)."""
    cudart = _cudart()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise PeerGone(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def _handle_bytes(handle: Any) -> bytes:
    raw = handle.reserved
    return bytes(raw) if isinstance(raw, (bytes, bytearray)) else bytes(x & 0xFF for x in raw)


def data_offset(num_blocks: int) -> int:
    return (8 * num_blocks + ALIGN - 1) // ALIGN * ALIGN


def device_uuid(device: int) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


class _CudaArray:
    """A raw device allocation seen by torch (``__cuda_array_interface__``), zero copy."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


class CudaExportRegion:
    """The exporter's KV region on a GPU. ``tickets``: int64[num_blocks]; ``data``: [num_blocks, L, P]."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        cudart = _cudart()
        self.layout, self.num_blocks, self.device = layout, num_blocks, device
        self._offset = data_offset(num_blocks)
        size = self._offset + num_blocks * block_nbytes(layout)
        torch.cuda.set_device(device)
        _check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._ptr: int | None = int(_check(cudart.cudaMalloc(size), "cudaMalloc"))
        _check(cudart.cudaMemset(self._ptr, 0, size), "cudaMemset")
        raw = torch.as_tensor(_CudaArray(self._ptr, size), device=f"cuda:{device}")
        self.tickets = raw[: 8 * num_blocks].view(torch.int64)  # int64[num_blocks]
        dtype = torch_dtype(layout.dtype)
        self.data = raw[self._offset :].view(dtype).view(num_blocks, layout.num_layers, layout.page_elems)
        handle = _check(cudart.cudaIpcGetMemHandle(self._ptr), "cudaIpcGetMemHandle")
        b64 = base64.b64encode(_handle_bytes(handle)).decode()
        self.name = f"{PREFIX}{os.getpid()}:{device_uuid(device)}:{b64}:{num_blocks}"

    def set_tickets(self, blocks: Sequence[int], ticket: int) -> None:
        """Set tickets after the blocks' data is written; synchronises so readers see data first."""
        torch.cuda.synchronize(self.device)
        self.tickets[torch.as_tensor(list(blocks), dtype=torch.int64, device=self.tickets.device)] = ticket
        torch.cuda.synchronize(self.device)

    def clear_tickets(self, blocks: Sequence[int]) -> None:
        self.set_tickets(blocks, 0)

    def close(self) -> None:
        if self._ptr is None:
            return
        self.tickets.zero_()
        torch.cuda.synchronize(self.device)
        ptr, self._ptr = self._ptr, None
        del self.tickets, self.data
        _check(_cudart().cudaFree(ptr), "cudaFree")


@dataclass(frozen=True)
class _Remote:
    pid: int
    uuid: str
    handle: bytes
    num_blocks: int


def parse_region(region: str) -> _Remote:
    if not region.startswith(PREFIX):
        raise PeerGone(f"{region[:40]!r} is not a cuda-ipc region")
    try:
        pid, uuid, b64, n = region[len(PREFIX) :].split(":")
        handle = base64.b64decode(b64, validate=True)
        remote = _Remote(int(pid), uuid, handle, int(n))
    except ValueError as exc:
        raise PeerGone(f"malformed cuda-ipc region {region[:60]!r}") from exc
    if len(handle) != 64 or remote.num_blocks < 1:
        raise PeerGone("malformed cuda-ipc handle")
    return remote


class CudaIpcReader(KVReader):
    backend = "cuda-ipc"

    def __init__(self, max_peers: int = 8) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        ok, why = cuda_ipc_available()
        if not ok:
            raise NotAvailable(why)
        self._cudart = _cudart()
        self._max = max_peers
        self._open: OrderedDict[str, int] = OrderedDict()  # region -> opened device pointer
        self._lock = threading.Lock()
        self._streams: dict[int, Any] = {}  # device -> this reader's stream (cudaStream_t)

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
        src = check_read(desc, target, len(dst_block_ids), first_block, self.backend)
        kv = target.kv
        if not kv.is_cuda or kv.stride(2) != 1:
            raise LayoutMismatch("cuda-ipc reads into a CUDA cache with contiguous pages")
        remote = parse_region(desc.region)
        if remote.uuid != device_uuid(kv.device.index):
            here = device_uuid(kv.device.index)
            raise PeerGone(f"the export is on GPU {remote.uuid}, this cache on {here}")
        check_src_ids(desc, remote.num_blocks)
        base = self._base(desc.region, remote, kv.device.index)
        if not self._tickets_match(base, remote.num_blocks, src, desc.ticket):
            raise LeaseExpired(f"ticket {desc.ticket} no longer holds its blocks")
        stream = self._stream(kv.device.index)
        nbytes = self._copy(base + data_offset(remote.num_blocks), src, kv, dst_block_ids, stream)
        self._wait(stream, t0 + timeout_s, timeout_s)
        if not self._tickets_match(base, remote.num_blocks, src, desc.ticket):
            raise LeaseExpired(f"ticket {desc.ticket} lost its blocks during the read")
        return ReadResult(blocks=len(src), nbytes=nbytes, seconds=time.monotonic() - t0)

    def _copy(self, src_base: int, src: list[int], kv: torch.Tensor, dst: Sequence[int], stream: Any) -> int:
        cudart = self._cudart
        item = kv.element_size()
        layers, page = kv.shape[1], kv.shape[2] * item
        src_block = layers * page
        s0, s1 = kv.stride(0) * item, kv.stride(1) * item
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        block_major = s1 == page and s0 == src_block
        for s, d, k in block_runs(src, dst):
            if block_major:  # [k, L, P] contiguous on both sides: one copy
                _check(cudart.cudaMemcpyAsync(kv.data_ptr() + d * s0, src_base + s * src_block, k * src_block,
                                              kind, stream), "cudaMemcpyAsync")
                continue
            for layer in range(layers):  # k pages, strided on both sides: one 2D copy per layer
                _check(cudart.cudaMemcpy2DAsync(
                    kv.data_ptr() + d * s0 + layer * s1, s0,
                    src_base + s * src_block + layer * page, src_block,
                    page, k, kind, stream), "cudaMemcpy2DAsync")
        return len(src) * src_block

    def _wait(self, stream: Any, deadline: float, timeout_s: float) -> None:
        cudart = self._cudart
        pause = POLL_S[0]
        while True:
            err = cudart.cudaStreamQuery(stream)[0]
            if err == cudart.cudaError_t.cudaSuccess:
                return
            if err != cudart.cudaError_t.cudaErrorNotReady:
                raise PeerGone(f"cuda-ipc copy failed: {err}")
            if time.monotonic() > deadline:
                # the destination is the caller's again only once the copies are over
                _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
                raise TransferTimeout(f"cuda-ipc copy passed {timeout_s} s")
            time.sleep(pause)
            pause = min(pause * 2, POLL_S[1])

    def _tickets_match(self, base: int, num_blocks: int, blocks: list[int], ticket: int) -> bool:
        host = torch.empty(num_blocks, dtype=torch.int64)
        cudart = self._cudart
        _check(cudart.cudaMemcpy(host.data_ptr(), base, 8 * num_blocks,
                                 cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy (tickets)")
        return bool((host[torch.as_tensor(blocks, dtype=torch.int64)] == ticket).all())

    def _stream(self, device: int) -> Any:
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                _check(self._cudart.cudaSetDevice(device), "cudaSetDevice")
                stream = _check(self._cudart.cudaStreamCreateWithFlags(
                    self._cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
                self._streams[device] = stream
            return stream

    def _base(self, region: str, remote: _Remote, device: int) -> int:
        """The opened pointer of a peer's region: opened once, kept in a bounded LRU."""
        cudart = self._cudart
        with self._lock:
            ptr = self._open.get(region)
            if ptr is not None:
                self._open.move_to_end(region)
                return ptr
            _check(cudart.cudaSetDevice(device), "cudaSetDevice")
            handle = cudart.cudaIpcMemHandle_t()
            handle.reserved = remote.handle
            ptr = int(_check(cudart.cudaIpcOpenMemHandle(handle, cudart.cudaIpcMemLazyEnablePeerAccess),
                             f"cudaIpcOpenMemHandle (exporter pid {remote.pid})"))
            self._open[region] = ptr
            while len(self._open) > self._max:
                _, old = self._open.popitem(last=False)
                cudart.cudaIpcCloseMemHandle(old)
            return ptr

    @property
    def open_handles(self) -> int:
        with self._lock:
            return len(self._open)

    def close(self) -> None:
        with self._lock:
            for ptr in self._open.values():
                self._cudart.cudaIpcCloseMemHandle(ptr)
            self._open.clear()
            for stream in self._streams.values():
                self._cudart.cudaStreamDestroy(stream)
            self._streams.clear()
