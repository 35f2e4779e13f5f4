"""CmaReader: process_vm_readv out of the exporter's own mapping, with the ticket and checksum checks."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import ChecksumMismatch, LeaseExpired, PeerGone
from kvrelay.transport.kv.base import BlockTarget, host_identity
from kvrelay.transport.kv.cma import CmaDenied, CmaReader, _batches, cma_permitted
from kvrelay.transport.kv.copy import checksum
from kvrelay.transport.kv.region import ExportRegion, new_region_name

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=4, dtype="float32", page_elems=32)
TICKET = 99

pytestmark = pytest.mark.skipif(not cma_permitted()[0], reason=f"cma not permitted: {cma_permitted()[1]}")


def desc_for(name: str, blocks: list[int], num_tokens: int, **kw) -> KVDescriptor:
    fields = dict(
        backend="shm",
        worker_id="p",
        host=host_identity(),
        region=name,
        block_ids=blocks,
        num_tokens=num_tokens,
        ticket=TICKET,
        lease_expires_ms=int(time.time() * 1000) + 60_000,
        layout=LAYOUT,
    )
    fields.update(kw)
    return KVDescriptor(**fields)


def layer_major(num_blocks: int = 12) -> BlockTarget:
    flat = torch.zeros(2 * num_blocks * 32)
    return BlockTarget(
        kv=torch.as_strided(flat, (num_blocks, 2, 32), (32, num_blocks * 32, 1)), layout=LAYOUT
    )


@pytest.fixture
def region(tmp_path: Path):
    r = ExportRegion.create(new_region_name(), LAYOUT, num_blocks=16, directory=tmp_path)
    r.data.copy_(torch.randn(16, 2, 32))
    yield r
    r.close()


def test_cma_read_copies_blocks_and_checks_tickets(region: ExportRegion, tmp_path: Path) -> None:
    reader = CmaReader(tmp_path)
    region.set_tickets([2, 3, 7], TICKET)
    tgt = layer_major()
    res = reader.read(desc_for(region.name, [2, 3, 7], 11), tgt, [0, 5, 6], timeout_s=5)
    assert res.nbytes == 3 * 2 * 32 * 4
    for s, d in zip([2, 3, 7], [0, 5, 6], strict=True):
        assert torch.equal(tgt.kv[d], region.data[s])
    region.clear_tickets([7])
    with pytest.raises(LeaseExpired):
        reader.read(desc_for(region.name, [2, 3, 7], 11), tgt, [0, 5, 6], timeout_s=5)


def test_cma_checksum_whole_and_partial(region: ExportRegion, tmp_path: Path) -> None:
    reader = CmaReader(tmp_path)
    blocks = [4, 5, 6]
    region.set_tickets(blocks, TICKET)
    desc = desc_for(region.name, blocks, 12, checksum=checksum(region.data, blocks))
    reader.read(desc, layer_major(), [0, 1, 2], timeout_s=5)
    reader.read(desc, layer_major(), [1, 2], first_block=1, timeout_s=5)
    region.data[5, 1, 3] += 1.0
    with pytest.raises(ChecksumMismatch):
        reader.read(desc, layer_major(), [0, 1, 2], timeout_s=5)
    with pytest.raises(ChecksumMismatch):
        reader.read(desc, layer_major(), [1, 2], first_block=1, timeout_s=5)


def test_cma_reads_another_process_and_sees_it_die(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        from kvrelay.schemas.messages import KVLayout
        from kvrelay.transport.kv.region import ExportRegion
        lay = KVLayout.from_mapping({LAYOUT.to_mapping()!r})
        r = ExportRegion.create("kvrelay-cma-child", lay, 8, Path({str(tmp_path)!r}))
        r.data.copy_(torch.arange(8 * 2 * 32, dtype=torch.float32).view(8, 2, 32))
        r.set_tickets([1, 2], {TICKET})
        print("ready", flush=True)
        sys.stdin.read()
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        reader = CmaReader(tmp_path)
        tgt = layer_major()
        desc = desc_for("kvrelay-cma-child", [1, 2], 8)
        reader.read(desc, tgt, [3, 4], timeout_s=5)
        want = torch.arange(8 * 2 * 32, dtype=torch.float32).view(8, 2, 32)
        assert torch.equal(tgt.kv[3], want[1]) and torch.equal(tgt.kv[4], want[2])
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        assert (tmp_path / "kvrelay-cma-child").exists()  # a killed owner leaves its file behind
        with pytest.raises(PeerGone):
            reader.read(desc, tgt, [3, 4], timeout_s=5)
        with pytest.raises(PeerGone):  # a fresh reader: the header names a dead pid
            CmaReader(tmp_path).read(desc, tgt, [3, 4], timeout_s=5)
    finally:
        child.kill()
        child.wait(30)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_cma_other_uid_is_denied() -> None:
    """A reader that may not ptrace the owner gets CmaDenied (the caller then maps the region)."""
    shared = Path(
        tempfile.mkdtemp(prefix="kvrelay-cma-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    try:
        shared.chmod(0o755)
        region = ExportRegion.create(new_region_name(), LAYOUT, num_blocks=4, directory=shared)
        region.path.chmod(0o644)  # the other uid may read the file: only the memory read is refused
        region.set_tickets([1], TICKET)
        _denied_in_other_uid(region, shared)
        region.close()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _denied_in_other_uid(region: ExportRegion, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from kvrelay.schemas.messages import KVDescriptor, KVLayout
        from kvrelay.transport.kv.base import BlockTarget
        from kvrelay.transport.kv.cma import CmaDenied, CmaReader
        import torch
        lay = KVLayout.from_mapping({LAYOUT.to_mapping()!r})
        d = KVDescriptor(backend="shm", worker_id="p", host={host_identity()!r}, region={region.name!r},
                         block_ids=[1], num_tokens=4, ticket={TICKET},
                         lease_expires_ms=int(time.time()*1000)+60000,
                         layout=lay)
        tgt = BlockTarget(torch.zeros(2, 2, 32), lay)
        os.setgid(65534); os.setuid(65534)  # after the imports: the interpreter's files may be root's
        try:
            CmaReader(Path({str(tmp_path)!r})).read(d, tgt, [0], timeout_s=5)
            print("read")
        except CmaDenied as exc:
            print("denied", exc.code)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "denied cma_denied", out.stderr[-2000:]
    assert issubclass(CmaDenied, PeerGone)


def _stream_offsets(spans: list[tuple[int, int]]):
    """address -> offset in the byte stream the spans make, for addresses inside a span."""
    starts = []
    pos = 0
    for a, n in spans:
        starts.append((a, n, pos))
        pos += n

    def offset(addr: int) -> int:
        for a, n, at in starts:
            if a <= addr < a + n:
                return at + addr - a
        raise AssertionError(f"address {addr} outside every span")

    return offset


@pytest.mark.parametrize("seed", range(20))
def test_cma_batches_cover_both_sides_byte_for_byte(seed: int) -> None:
    rng = random.Random(seed)
    total = rng.randrange(2, 5000)

    def spans(k: int, base: int) -> list[tuple[int, int]]:
        edges = [0, *sorted(rng.sample(range(1, total), min(k, total - 1))), total]
        # spans scattered in memory (gaps between them), in stream order
        return [(base + 7 * a, b - a) for a, b in zip(edges, edges[1:], strict=False)]

    local, remote = spans(rng.randrange(0, 3000), 10_000_000), spans(rng.randrange(0, 3000), 90_000_000)
    loff, roff = _stream_offsets(local), _stream_offsets(remote)
    lpos = rpos = 0
    for lb, rb in _batches(local, remote):
        assert 0 < len(lb) <= 1024 and 0 < len(rb) <= 1024
        assert sum(n for _, n in lb) == sum(n for _, n in rb)
        for a, n in lb:
            assert loff(a) == lpos and n > 0
            lpos += n
        for a, n in rb:
            assert roff(a) == rpos and n > 0
            rpos += n
    assert lpos == rpos == total
