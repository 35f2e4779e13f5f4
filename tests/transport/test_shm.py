"""ShmReader: same-host KV reads out of an export region, with the seqlock and checksum checks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import ChecksumMismatch, LayoutMismatch, LeaseExpired, PeerGone, TransferTimeout
from kvrelay.transport.kv.base import BlockTarget, host_identity
from kvrelay.transport.kv.copy import checksum
from kvrelay.transport.kv.region import ExportRegion, new_region_name
from kvrelay.transport.kv.shm import ShmReader

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=4, dtype="float32", page_elems=32)
TICKET = 77


@pytest.fixture
def region(tmp_path: Path):
    r = ExportRegion.create(new_region_name(), LAYOUT, num_blocks=16, directory=tmp_path)
    r.data.copy_(torch.randn(16, 2, 32))
    yield r
    r.close()


@pytest.fixture
def reader(tmp_path: Path):
    rd = ShmReader(directory=tmp_path, max_regions=2)
    yield rd
    rd.close()


def export(region: ExportRegion, blocks: list[int], num_tokens: int, **kw) -> KVDescriptor:
    region.set_tickets(blocks, TICKET)
    fields = dict(
        backend="shm",
        worker_id="p1",
        host=host_identity(),
        region=region.name,
        block_ids=blocks,
        num_tokens=num_tokens,
        ticket=TICKET,
        lease_expires_ms=int(time.time() * 1000) + 60_000,
        layout=LAYOUT,
    )
    fields.update(kw)
    return KVDescriptor(**fields)


def target(num_blocks: int = 10) -> BlockTarget:
    flat = torch.zeros(2 * num_blocks * 32)
    kv = torch.as_strided(flat, (num_blocks, 2, 32), (32, num_blocks * 32, 1))  # layer-major like vLLM
    return BlockTarget(kv=kv, layout=LAYOUT)


def test_shm_read_copies_blocks(region: ExportRegion, reader: ShmReader) -> None:
    desc = export(region, [5, 6, 7], num_tokens=10)
    tgt = target()
    res = reader.read(desc, tgt, [2, 3, 9], timeout_s=5)
    assert (res.blocks, res.nbytes) == (3, 3 * 2 * 32 * 4)
    for s, d in zip([5, 6, 7], [2, 3, 9], strict=True):
        assert torch.equal(tgt.kv[d], region.data[s])


def test_shm_read_skips_locally_held_leading_blocks(region: ExportRegion, reader: ShmReader) -> None:
    desc = export(region, [5, 6, 7], num_tokens=12)
    tgt = target()
    reader.read(desc, tgt, [4], first_block=2, timeout_s=5)
    assert torch.equal(tgt.kv[4], region.data[7])
    assert float(tgt.kv[[0, 1, 2, 3]].abs().sum()) == 0.0


def test_shm_read_released_ticket_is_lease_expired(region: ExportRegion, reader: ShmReader) -> None:
    desc = export(region, [1, 2], num_tokens=8)
    region.clear_tickets([2])
    with pytest.raises(LeaseExpired):
        reader.read(desc, target(), [0, 1], timeout_s=5)


def test_shm_read_reused_blocks_is_lease_expired(region: ExportRegion, reader: ShmReader) -> None:
    desc = export(region, [1, 2], num_tokens=8)
    region.set_tickets([1, 2], TICKET + 1)
    with pytest.raises(LeaseExpired):
        reader.read(desc, target(), [0, 1], timeout_s=5)


def test_shm_read_past_lease_expiry_is_lease_expired(region: ExportRegion, reader: ShmReader) -> None:
    desc = export(region, [1], num_tokens=3, lease_expires_ms=int(time.time() * 1000) - 1)
    with pytest.raises(LeaseExpired):
        reader.read(desc, target(), [0], timeout_s=5)


def test_shm_read_checks_checksum(region: ExportRegion, reader: ShmReader) -> None:
    good = export(region, [3, 4], num_tokens=8, checksum=checksum(region.data, [3, 4]))
    reader.read(good, target(), [0, 1], timeout_s=5)
    bad = good.replace(checksum=(good.checksum + 1) % (1 << 32))
    with pytest.raises(ChecksumMismatch):
        reader.read(bad, target(), [0, 1], timeout_s=5)


def test_shm_read_other_host_or_backend_is_peer_gone(region: ExportRegion, reader: ShmReader) -> None:
    desc = export(region, [1], num_tokens=4)
    with pytest.raises(PeerGone):
        reader.read(desc.replace(host="elsewhere"), target(), [0], timeout_s=5)
    with pytest.raises(PeerGone):
        reader.read(desc.replace(backend="tcp"), target(), [0], timeout_s=5)


def test_shm_read_gone_region_is_peer_gone(tmp_path: Path, reader: ShmReader) -> None:
    r = ExportRegion.create(new_region_name(), LAYOUT, 4, tmp_path)
    desc = export(r, [0], num_tokens=4)
    reader.read(desc, target(), [0], timeout_s=5)  # now cached
    r.close()
    with pytest.raises(PeerGone):
        reader.read(desc, target(), [0], timeout_s=5)
    with pytest.raises(PeerGone):
        reader.read(desc.replace(region="kvrelay-missing"), target(), [0], timeout_s=5)


def test_shm_read_layout_mismatch(region: ExportRegion, reader: ShmReader) -> None:
    desc = export(region, [1], num_tokens=4)
    other = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=4, dtype="bfloat16", page_elems=32)
    kv = torch.zeros(4, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(LayoutMismatch):
        reader.read(desc, BlockTarget(kv=kv, layout=other), [0], timeout_s=5)
    with pytest.raises(LayoutMismatch):  # blocks do not cover num_tokens
        reader.read(desc.replace(num_tokens=9), target(), [0], timeout_s=5)
    with pytest.raises(LayoutMismatch):  # asks for more blocks than exported
        reader.read(desc, target(), [0, 1], timeout_s=5)
    with pytest.raises(LayoutMismatch):  # block id outside the region
        reader.read(desc.replace(block_ids=[99]), target(), [0], timeout_s=5)


def test_shm_read_timeout(region: ExportRegion, reader: ShmReader) -> None:
    desc = export(region, [1, 2], num_tokens=8)
    with pytest.raises(TransferTimeout):
        reader.read(desc, target(), [0, 1], timeout_s=-1)


def test_shm_reader_caches_a_bounded_number_of_regions(tmp_path: Path, reader: ShmReader) -> None:
    regions = [ExportRegion.create(new_region_name(), LAYOUT, 2, tmp_path) for _ in range(4)]
    try:
        for r in regions:
            reader.read(export(r, [0], num_tokens=4), target(), [0], timeout_s=5)
        assert len(reader._regions) == 2
    finally:
        for r in regions:
            r.close()
