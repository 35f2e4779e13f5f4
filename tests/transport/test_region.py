"""ExportRegion (shared-memory export region) and the block copy helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvrelay.schemas.messages import KVLayout
from kvrelay.transport.errors import LayoutMismatch, PeerGone
from kvrelay.transport.kv.copy import MAX_RUNS, block_runs, checksum, copy_blocks, zero_blocks
from kvrelay.transport.kv.region import ExportRegion, block_nbytes, blocks_for_bytes, new_region_name

LAYOUT = KVLayout(
    num_layers=3, num_kv_heads=2, head_dim=4, block_size=2, dtype="bfloat16", page_elems=2 * 2 * 2 * 4
)


@pytest.fixture
def region(tmp_path: Path):
    r = ExportRegion.create(new_region_name(), LAYOUT, num_blocks=8, directory=tmp_path)
    yield r
    r.close()


def test_region_create_gives_zeroed_views_of_the_layout(region: ExportRegion) -> None:
    assert region.data.shape == (8, 3, 32) and region.data.dtype == torch.bfloat16
    assert region.tickets.shape == (8,) and int(region.tickets.abs().sum()) == 0
    assert region.block_nbytes == block_nbytes(LAYOUT) == 3 * 32 * 2
    assert region.data.is_contiguous()


def test_region_attach_shares_memory_with_owner(region: ExportRegion, tmp_path: Path) -> None:
    other = ExportRegion.attach(region.name, LAYOUT, tmp_path)
    try:
        region.data[3].fill_(1.5)
        region.set_tickets([3], 42)
        assert bool((other.data[3] == 1.5).all())
        assert other.tickets_match([3], 42) and not other.tickets_match([3, 4], 42)
        other.clear_tickets([3])
        assert int(region.tickets[3]) == 0
    finally:
        other.close()
    assert region.path.exists()  # only the owner unlinks


def test_region_is_shared_with_another_process(region: ExportRegion, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        from pathlib import Path
        from kvrelay.schemas.messages import KVLayout
        from kvrelay.transport.kv.region import ExportRegion
        lay = KVLayout.from_mapping({LAYOUT.to_mapping()!r})
        r = ExportRegion.attach({region.name!r}, lay, Path({str(tmp_path)!r}))
        r.data[5].fill_(7.0)
        r.set_tickets([5], 99)
        r.close()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert bool((region.data[5] == 7.0).all()) and region.tickets_match([5], 99)


def test_region_attach_missing_is_peer_gone(tmp_path: Path) -> None:
    with pytest.raises(PeerGone):
        ExportRegion.attach("kvrelay-nope", LAYOUT, tmp_path)


@pytest.mark.parametrize("name", ["../etc/passwd", "", "a/b", "-x", "x" * 200])
def test_region_bad_names_are_rejected(name: str, tmp_path: Path) -> None:
    with pytest.raises(PeerGone):
        ExportRegion.attach(name, LAYOUT, tmp_path)


def test_region_attach_with_other_layout_is_layout_mismatch(region: ExportRegion, tmp_path: Path) -> None:
    other = LAYOUT.replace(dtype="float16")
    with pytest.raises(LayoutMismatch):
        ExportRegion.attach(region.name, other, tmp_path)


def test_region_attach_of_foreign_file_is_peer_gone(tmp_path: Path) -> None:
    (tmp_path / "kvrelay-junk").write_bytes(b"x" * 8192)
    with pytest.raises(PeerGone):
        ExportRegion.attach("kvrelay-junk", LAYOUT, tmp_path)


def test_region_owner_close_unlinks_and_clears_tickets(tmp_path: Path) -> None:
    owner = ExportRegion.create(new_region_name(), LAYOUT, 4, tmp_path)
    reader = ExportRegion.attach(owner.name, LAYOUT, tmp_path)
    owner.set_tickets([0, 1], 5)
    owner.close()
    owner.close()  # idempotent
    assert not owner.path.exists() and owner.closed
    assert not reader.tickets_match([0, 1], 5)  # a reader still mapping it sees the leases gone
    reader.close()
    with pytest.raises(PeerGone):
        ExportRegion.attach(owner.name, LAYOUT, tmp_path)


def test_region_owner_file_goes_at_exit_without_close(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        from pathlib import Path
        from kvrelay.schemas.messages import KVLayout
        from kvrelay.transport.kv.region import ExportRegion
        lay = KVLayout.from_mapping({LAYOUT.to_mapping()!r})
        r = ExportRegion.create("kvrelay-exit-test", lay, 2, Path({str(tmp_path)!r}))
        print(r.path.exists())
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True
    )
    assert out.stdout.strip() == "True"
    assert not (tmp_path / "kvrelay-exit-test").exists()


def test_region_create_twice_fails(region: ExportRegion, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="cannot create"):
        ExportRegion.create(region.name, LAYOUT, 4, tmp_path)


def test_region_in_default_dir_roundtrip() -> None:
    r = ExportRegion.create(new_region_name(), LAYOUT, 2)
    try:
        assert r.path.exists()
        ExportRegion.attach(r.name, LAYOUT).close()
    finally:
        r.close()
    assert not r.path.exists()


def test_region_blocks_for_bytes() -> None:
    assert blocks_for_bytes(LAYOUT, 10 * block_nbytes(LAYOUT) + 1) == 10
    with pytest.raises(ValueError):
        blocks_for_bytes(LAYOUT, block_nbytes(LAYOUT) - 1)


# -- copy helpers -----------------------------------------------------------------------------


def layer_major_cache(num_layers: int, num_blocks: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like vLLM's CPU cache: layers contiguous one after another; returns (storage, block-major view)."""
    flat = torch.zeros(num_layers * num_blocks * page)
    view = torch.as_strided(flat, (num_blocks, num_layers, page), (page, num_blocks * page, 1))
    return flat, view


def test_copy_block_runs_groups_consecutive_pairs() -> None:
    assert block_runs([4, 5, 6, 9], [0, 1, 2, 3]) == [(4, 0, 3), (9, 3, 1)]
    assert block_runs([1, 2], [5, 7]) == [(1, 5, 1), (2, 7, 1)]
    assert block_runs([], []) == []


@pytest.mark.parametrize("scattered", [False, True])
def test_copy_blocks_into_layer_major_cache(scattered: bool) -> None:
    n_src = 3 * MAX_RUNS
    src = torch.randn(n_src, 3, 16)
    flat, dst = layer_major_cache(3, n_src + 8, 16)
    src_ids = list(range(0, n_src, 2)) if scattered else [1, 2, 3, 4]
    dst_ids = [i + 3 for i in range(len(src_ids))]
    nbytes = copy_blocks(src, src_ids, dst, dst_ids)
    assert nbytes == len(src_ids) * 3 * 16 * 4
    for s, d in zip(src_ids, dst_ids, strict=True):
        assert torch.equal(dst[d], src[s])
        # layer l of block d lives at flat[l * blocks * page + d * page]
        assert torch.equal(flat[(n_src + 8) * 16 + d * 16 : (n_src + 8) * 16 + (d + 1) * 16], src[s, 1])
    untouched = [b for b in range(n_src + 8) if b not in dst_ids]
    assert float(dst[untouched].abs().sum()) == 0.0


def test_copy_blocks_checks_shapes_and_ids() -> None:
    a, b = torch.zeros(4, 2, 8), torch.zeros(4, 2, 8)
    with pytest.raises(ValueError):
        copy_blocks(a, [0, 1], b, [0])
    with pytest.raises(ValueError):
        copy_blocks(a, [4], b, [0])
    with pytest.raises(ValueError):
        copy_blocks(a, [0], torch.zeros(4, 3, 8), [0])
    with pytest.raises(ValueError):
        copy_blocks(a, [0], b.to(torch.bfloat16), [0])


def test_copy_zero_and_checksum() -> None:
    x = torch.randn(6, 2, 8).to(torch.bfloat16)
    c1 = checksum(x, [1, 2, 4])
    assert c1 == checksum(x.clone(), [1, 2, 4])
    assert c1 != checksum(x, [4, 2, 1])
    x[2, 1, 3] += 1
    assert checksum(x, [1, 2, 4]) != c1
    zero_blocks(x, [2, 4])
    assert float(x[[2, 4]].float().abs().sum()) == 0.0 and float(x[1].float().abs().sum()) > 0


def test_region_records_its_owner_mapping_for_cma(region: ExportRegion, tmp_path: Path) -> None:
    header = region.path.read_bytes()[:4096]
    assert ExportRegion.read_owner_map(header) == (os.getpid(), region.base_address)
    assert region.base_address == region.tickets.data_ptr() - 4096
    other = ExportRegion.attach(region.name, LAYOUT, tmp_path, populate=False)
    try:  # a reader's mapping elsewhere in memory; the header still names the owner's
        assert other.base_address != region.base_address
        assert ExportRegion.read_owner_map(other.path.read_bytes()[:4096])[1] == region.base_address
    finally:
        other.close()


def test_region_block_bytes_are_the_blocks(region: ExportRegion) -> None:
    region.data.copy_(torch.randn(8, 3, 32).to(torch.bfloat16))
    with region.block_bytes(2, 3) as raw:
        assert len(raw) == 3 * region.block_nbytes
        assert bytes(raw) == region.data[2:5].contiguous().view(torch.uint8).numpy().tobytes()
    with pytest.raises(LayoutMismatch):
        region.block_bytes(7, 2)


def test_region_without_prefault_works_the_same(tmp_path: Path) -> None:
    r = ExportRegion.create(new_region_name(), LAYOUT, 4, tmp_path, prefault=False)
    try:
        r.data[1].fill_(2.0)
        other = ExportRegion.attach(r.name, LAYOUT, tmp_path)
        assert bool((other.data[1] == 2.0).all())
        other.close()
    finally:
        r.close()


def test_region_sweep_removes_only_regions_whose_owner_died(tmp_path: Path) -> None:
    """A SIGKILLed owner's region is swept by the next create; live ones and foreign files stay."""
    from kvrelay.transport.kv.region import sweep_stale

    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from kvrelay.schemas.messages import KVLayout
        from kvrelay.transport.kv.region import ExportRegion, new_region_name
        layout = KVLayout(**{LAYOUT.to_mapping()!r})
        r = ExportRegion.create(new_region_name(), layout, num_blocks=4, directory=Path({str(tmp_path)!r}))
        print(r.name, flush=True)
        sys.stdin.read()  # until the parent kills us
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        name = child.stdout.readline().strip()
        assert (tmp_path / name).exists()
        (tmp_path / "sem.other-program").write_bytes(b"x")  # not ours: never touched
        mine = ExportRegion.create(new_region_name(), LAYOUT, num_blocks=2, directory=tmp_path)
        assert sweep_stale(tmp_path, min_age_s=0) == []  # both owners alive
        assert sweep_stale(tmp_path) == []  # and young files are never judged
    finally:
        child.kill()
        child.wait(30)
    assert (tmp_path / name).exists()  # SIGKILL: nothing of the owner's cleanup ran
    assert sweep_stale(tmp_path, min_age_s=0) == [name]
    assert not (tmp_path / name).exists()
    assert (tmp_path / mine.name).exists() and (tmp_path / "sem.other-program").exists()
    mine.close()
    assert not (tmp_path / mine.name).exists()
