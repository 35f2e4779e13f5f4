"""NixlReader against a NixlExporter in another process (NIXL's UCX backend over host memory).

Skipped cleanly where NIXL is not installed (it is an optional extra: ``kvrelay[nixl]``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import ChecksumMismatch, LeaseExpired, PeerGone
from kvrelay.transport.kv.base import BlockTarget
from kvrelay.transport.kv.nixl import Locator, NotAvailable, nixl_available

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, block_size=4, dtype="float32", page_elems=64)
TICKET = 31337

pytestmark = pytest.mark.skipif(not nixl_available()[0], reason=f"NIXL not available: {nixl_available()[1]}")

EXPORTER = """
import sys, torch, zlib
from pathlib import Path
from kvrelay.schemas.messages import KVLayout
from kvrelay.transport.kv.copy import checksum
from kvrelay.transport.kv.nixl import NixlExporter
from kvrelay.transport.kv.region import ExportRegion
lay = KVLayout.from_mapping({layout!r})
r = ExportRegion.create("kvrelay-nixl-test", lay, 16, Path({dir!r}))
r.data.copy_(torch.arange(16 * 2 * 64, dtype=torch.float32).view(16, 2, 64))
r.set_tickets([3, 4, 5, 9], {ticket})
exp = NixlExporter(r, agent_name="kvrelay-test-exporter")
print("@@", exp.name, checksum(r.data, [3, 4, 5, 9]), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "clear":
        r.clear_tickets([int(cmd[1])])
    elif cmd[0] == "flip":
        r.data[int(cmd[1]), 0, 0] += 1.0
    print("@@ ok", flush=True)
"""


@pytest.fixture(scope="module")
def exporter(tmp_path_factory):
    d = tmp_path_factory.mktemp("nixl")
    code = textwrap.dedent(EXPORTER.format(layout=LAYOUT.to_mapping(), dir=str(d), ticket=TICKET))
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    _, name, crc = answer(child).split()
    yield child, name, int(crc)
    child.kill()
    child.wait(30)


def answer(child) -> str:
    """The child's next line of ours (NIXL logs to stdout too)."""
    while True:
        line = child.stdout.readline()
        assert line, "the exporter process ended"
        if line.startswith("@@"):
            return line.strip()


def tell(child, cmd: str) -> None:
    child.stdin.write(cmd + "\n")
    child.stdin.flush()
    assert answer(child) == "@@ ok"


@pytest.fixture(scope="module")
def reader():
    from kvrelay.transport.kv.nixl import NixlReader

    rd = NixlReader()
    yield rd
    rd.close()


def desc_for(region: str, blocks: list[int], num_tokens: int, **kw) -> KVDescriptor:
    fields = dict(
        backend="nixl",
        worker_id="p",
        host="other-node",
        region=region,
        block_ids=blocks,
        num_tokens=num_tokens,
        ticket=TICKET,
        lease_expires_ms=int(time.time() * 1000) + 60_000,
        layout=LAYOUT,
    )
    fields.update(kw)
    return KVDescriptor(**fields)


def layer_major(num_blocks: int = 10) -> BlockTarget:
    flat = torch.zeros(2 * num_blocks * 64)
    return BlockTarget(
        kv=torch.as_strided(flat, (num_blocks, 2, 64), (64, num_blocks * 64, 1)), layout=LAYOUT
    )


def want(block: int) -> torch.Tensor:
    return torch.arange(16 * 2 * 64, dtype=torch.float32).view(16, 2, 64)[block]


def test_nixl_read_across_processes(exporter, reader) -> None:
    _, name, crc = exporter
    tgt = layer_major()
    res = reader.read(desc_for(name, [3, 4, 5, 9], 15, checksum=crc), tgt, [1, 2, 6, 7], timeout_s=20)
    assert res.nbytes == 4 * 2 * 64 * 4
    for s, d in zip([3, 4, 5, 9], [1, 2, 6, 7], strict=True):
        assert torch.equal(tgt.kv[d], want(s))
    tgt2 = layer_major()  # a prefix-cache hit: only the last two blocks, checksum over all four
    reader.read(desc_for(name, [3, 4, 5, 9], 15, checksum=crc), tgt2, [0, 1], first_block=2, timeout_s=20)
    assert torch.equal(tgt2.kv[0], want(5)) and torch.equal(tgt2.kv[1], want(9))


def test_nixl_read_checks_tickets_and_checksum(exporter, reader) -> None:
    child, name, crc = exporter
    with pytest.raises(ChecksumMismatch):
        reader.read(
            desc_for(name, [3, 4, 5, 9], 15, checksum=crc ^ 1), layer_major(), [0, 1, 2, 3], timeout_s=20
        )
    tell(child, "clear 9")
    with pytest.raises(LeaseExpired):
        reader.read(desc_for(name, [3, 4, 5, 9], 15), layer_major(), [0, 1, 2, 3], timeout_s=20)


def test_nixl_bad_or_unreachable_locator_is_peer_gone(exporter, reader) -> None:
    _, name, _ = exporter
    loc = Locator.parse(name)
    with pytest.raises(PeerGone):
        Locator.parse("nixl:1|x")
    gone = Locator(
        "kvrelay-nobody", "127.0.0.1", 1, "DRAM", 0, loc.base, 16, loc.data_offset, loc.tickets_offset
    )
    from kvrelay.transport.kv.nixl import NixlReader

    rd = NixlReader(metadata_timeout_s=0.5)
    try:
        with pytest.raises(PeerGone):
            rd.read(desc_for(gone.encode(), [3], 4), layer_major(), [0], timeout_s=5)
    finally:
        rd.close()
    assert issubclass(NotAvailable, Exception)
