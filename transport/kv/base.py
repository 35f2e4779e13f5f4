"""The KV transfer interface: read an exported prefill's blocks into the local KV cache.

A backend (``shm``, ``cma``, ``tcp``, ``cuda-ipc``, ``nixl``) implements ``KVReader``. Given the
``KVDescriptor`` a prefill worker published and the local block ids to fill, ``read`` copies
the blocks and returns, or raises a ``KVTransferError`` subclass:

    PeerGone          the exporter or its memory is gone (or unreachable from this host)
    LeaseExpired      the blocks were released or reused before the read finished
    LayoutMismatch    the two sides' KV layouts differ
    ChecksumMismatch  the bytes read are not the bytes exported
    TransferTimeout   the read did not finish in ``timeout_s``

On any error the destination blocks hold garbage: the caller must treat them as not loaded.

``read`` is blocking and thread-safe: the vLLM connector calls it from its bounded worker
thread pool; asyncio code calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import LayoutMismatch, LeaseExpired, PeerGone
from kvrelay.transport.kv.region import layout_fingerprint, torch_dtype


def host_identity() -> str:
    """Names this host in descriptors: same-host backends (shm, cuda-ipc) compare it."""
    return socket.gethostname()


@dataclass(frozen=True)
class BlockTarget:
    """The local KV cache as one block-major view: ``kv`` is [num_blocks, num_layers, page_elems]."""

    kv: torch.Tensor
    layout: KVLayout

    def __post_init__(self) -> None:
        lay = self.layout
        if self.kv.dim() != 3 or tuple(self.kv.shape[1:]) != (lay.num_layers, lay.page_elems):
            raise LayoutMismatch(
                f"cache view {tuple(self.kv.shape)} is not [blocks, {lay.num_layers}, {lay.page_elems}]"
            )
        if self.kv.dtype != torch_dtype(lay.dtype):
            raise LayoutMismatch(f"cache dtype {self.kv.dtype} is not {lay.dtype}")

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[0]


@dataclass(frozen=True)
class ReadResult:
    blocks: int
    nbytes: int
    seconds: float


class KVReader(ABC):
    """Reads exported KV blocks into a ``BlockTarget``. One instance serves many reads."""

    backend: ClassVar[str]

    @abstractmethod
    def read(
        self,
        desc: KVDescriptor,
        target: BlockTarget,
        dst_block_ids: Sequence[int],
        *,
        first_block: int = 0,
        timeout_s: float,
    ) -> ReadResult:
        """Copy ``desc.block_ids[first_block:first_block + len(dst_block_ids)]`` into ``dst_block_ids``.

        ``first_block`` > 0 skips leading blocks the reader already holds (a prefix-cache hit).
        """

    def close(self) -> None:  # noqa: B027  (optional hook: most readers hold nothing)
        """Release whatever the reader keeps open (mappings, connections). Idempotent."""


def check_layouts(desc: KVDescriptor, target: BlockTarget) -> None:
    if layout_fingerprint(desc.layout) != layout_fingerprint(target.layout):
        raise LayoutMismatch(
            f"exported layout {desc.layout.to_mapping()} differs from local {target.layout.to_mapping()}"
        )


def check_span(desc: KVDescriptor, n_dst: int, first_block: int) -> None:
    if first_block < 0 or first_block + n_dst > len(desc.block_ids):
        raise LayoutMismatch(
            f"blocks {first_block}..{first_block + n_dst - 1} wanted, the export has {len(desc.block_ids)}"
        )
    needed = -(-desc.num_tokens // desc.layout.block_size)
    if len(desc.block_ids) != needed:
        raise LayoutMismatch(
            f"{desc.num_tokens} tokens need {needed} blocks, the export names {len(desc.block_ids)}"
        )


def offered(desc: KVDescriptor) -> tuple[str, ...]:
    """Every backend the exporter serves this descriptor by: its primary, then its fallbacks."""
    return (desc.backend, *(b for b in desc.fallbacks if b != desc.backend))


def check_offered(desc: KVDescriptor, backend: str) -> None:
    if backend not in offered(desc):
        raise PeerGone(f"the exporter serves this KV by {list(offered(desc))}, not {backend}")


def check_lease_time(desc: KVDescriptor) -> None:
    if time.time() * 1000 >= desc.lease_expires_ms:
        raise LeaseExpired(f"lease of ticket {desc.ticket} expired at {desc.lease_expires_ms}")


def check_read(desc: KVDescriptor, target: BlockTarget, n_dst: int, first_block: int, offered_as: str,
               reader: str = "", host: str | None = None) -> list[int]:
    """The checks every reader makes before moving a byte (offered backend, same host where the
    reader needs one, layouts, span, lease time); returns the source block ids of the span."""
    check_offered(desc, offered_as)
    if host is not None and desc.host != host:
        raise PeerGone(f"region is on host {desc.host!r}; {reader or offered_as} reads only on {host!r}")
    check_layouts(desc, target)
    check_span(desc, n_dst, first_block)
    check_lease_time(desc)
    return list(desc.block_ids[first_block : first_block + n_dst])


def check_src_ids(desc: KVDescriptor, num_blocks: int) -> None:
    if any(b < 0 or b >= num_blocks for b in desc.block_ids):
        raise LayoutMismatch(f"descriptor names blocks outside region {desc.region!r}")


def page_spans(
    target: BlockTarget, dst_block_ids: Sequence[int], *, device_ok: bool = False
) -> list[tuple[int, int]]:
    """(address, bytes) of the destination pages in wire order -- block by block, layer by layer --
    with neighbours in memory merged (a block-major cache gives one span per run of blocks).

    The target must be in host memory (or any device with ``device_ok``) with contiguous pages
    (``LayoutMismatch`` otherwise); the spans are valid while ``target.kv`` lives.
    """
    kv = target.kv
    if kv.device.type != "cpu" and not device_ok:
        raise LayoutMismatch(f"this reader fills host memory, the cache is on {kv.device}")
    if kv.stride(2) != 1:
        raise LayoutMismatch(f"cache pages are not contiguous (strides {kv.stride()})")
    if any(d < 0 or d >= kv.shape[0] for d in dst_block_ids):
        raise LayoutMismatch(f"destination block outside the cache of {kv.shape[0]} blocks")
    item = kv.element_size()
    page = kv.shape[2] * item
    s0, s1 = kv.stride(0) * item, kv.stride(1) * item
    base = kv.data_ptr()
    spans: list[tuple[int, int]] = []
    for d in dst_block_ids:
        at = base + d * s0
        for layer in range(kv.shape[1]):
            addr = at + layer * s1
            if spans and spans[-1][0] + spans[-1][1] == addr:
                spans[-1] = (spans[-1][0], spans[-1][1] + page)
            else:
                spans.append((addr, page))
    return spans


def pair_spans(
    local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]]
) -> list[tuple[int, int, int]]:
    """Two span lists over the same byte stream -> (local address, remote address, bytes) pieces."""
    out: list[tuple[int, int, int]] = []
    ri, roff = 0, 0
    for la, ln in local:
        done = 0
        while done < ln:
            if ri >= len(remote):
                raise LayoutMismatch("the two sides' spans cover different byte counts")
            ra, rn = remote[ri]
            take = min(ln - done, rn - roff)
            out.append((la + done, ra + roff, take))
            done += take
            roff += take
            if roff == rn:
                ri, roff = ri + 1, 0
    if ri != len(remote):
        raise LayoutMismatch("the two sides' spans cover different byte counts")
    return out
