"""A decode worker whose KV page layout differs from the exporter's is refused, never copied into.

KV pages move as opaque bytes (``kvrelay.kernels`` converts no layout), so two layouts with the
same bytes per block -- another page format, or KV heads traded for block size -- would be a
silent wrong copy if only sizes were compared. Every reader compares the two layouts first
(``transport/kv/base.py`` ``check_layouts``) and raises ``LayoutMismatch`` naming both; the
fetcher does not try another backend on it (only ``PeerGone`` falls through).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import LayoutMismatch
from kvrelay.transport.kv.base import BlockTarget, KVReader, ReadResult, host_identity
from kvrelay.transport.kv.cma import CmaReader
from kvrelay.transport.kv.fetch import KVFetcher
from kvrelay.transport.kv.region import ExportRegion, new_region_name
from kvrelay.transport.kv.shm import ShmReader
from kvrelay.transport.kv.tcp import TcpReader

# 2 layers, 2 KV heads x 4 tokens x 2*4 dims = 64 elements a page, vLLM CPU page format
EXPORTED = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float32", page_elems=64)
SAME_BYTES = {  # each has EXPORTED's bytes per block, so a size check alone would let it through
    "page-format": EXPORTED.replace(layout="gpu_nhd"),
    "heads-for-block-size": EXPORTED.replace(num_kv_heads=1, block_size=8),
    "heads-for-head-dim": EXPORTED.replace(num_kv_heads=1, head_dim=8),
}
TICKET = 5


@pytest.fixture
def region(tmp_path: Path) -> Iterator[ExportRegion]:
    r = ExportRegion.create(new_region_name(), EXPORTED, num_blocks=4, directory=tmp_path)
    r.data.copy_(torch.randn(4, 2, 64))  # [blocks, layers, page_elems]
    r.set_tickets([1, 2], TICKET)
    yield r
    r.close()


def descriptor(region: ExportRegion, backend: str) -> KVDescriptor:
    return KVDescriptor(
        backend=backend, worker_id="p1", host=host_identity(), region=region.name, block_ids=[1, 2],
        num_tokens=8, ticket=TICKET, lease_expires_ms=int(time.time() * 1000) + 60_000, layout=EXPORTED,
        endpoint="127.0.0.1:1" if backend == "tcp" else "",
    )  # fmt: skip


def local_cache(layout: KVLayout) -> BlockTarget:
    return BlockTarget(kv=torch.zeros(3, layout.num_layers, layout.page_elems), layout=layout)  # [3, L, P]


def reader_for(backend: str, tmp_path: Path) -> KVReader:
    if backend == "shm":
        return ShmReader(tmp_path)
    if backend == "cma":
        return CmaReader(tmp_path)
    return TcpReader()


@pytest.mark.parametrize("backend", ["shm", "cma", "tcp"])
@pytest.mark.parametrize("local", SAME_BYTES.values(), ids=SAME_BYTES.keys())
def test_reader_refuses_another_page_layout_and_names_both(region, tmp_path, backend, local) -> None:
    reader = reader_for(backend, tmp_path)
    target = local_cache(local)
    with pytest.raises(LayoutMismatch) as err:
        reader.read(descriptor(region, "tcp" if backend == "tcp" else "shm"), target, [0, 1], timeout_s=5)
    reader.close()
    assert err.value.code == "layout_mismatch"
    message = str(err.value)
    assert message.startswith("exported layout ")
    assert str(EXPORTED.to_mapping()) in message and str(local.to_mapping()) in message
    assert not target.kv.any()  # not a byte was copied


class Recording(KVReader):
    backend = "tcp"

    def __init__(self) -> None:
        self.calls = 0

    def read(self, desc, target, dst_block_ids: Sequence[int], *, first_block=0, timeout_s) -> ReadResult:
        self.calls += 1
        return ReadResult(blocks=len(dst_block_ids), nbytes=0, seconds=0.0)


def test_fetcher_does_not_fall_through_on_a_layout_mismatch(region, tmp_path) -> None:
    shm, tcp = ShmReader(tmp_path), Recording()
    fetcher = KVFetcher({"shm": shm, "tcp": tcp}, ["shm", "tcp"], host=host_identity())
    desc = descriptor(region, "shm").replace(fallbacks=["tcp"], endpoint="127.0.0.1:1")
    target = local_cache(SAME_BYTES["page-format"])
    with pytest.raises(LayoutMismatch, match="differs from local"):
        fetcher.read(desc, target, [0, 1], timeout_s=5)
    shm.close()
    assert tcp.calls == 0 and not target.kv.any()
