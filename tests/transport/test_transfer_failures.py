"""Readers that die mid-transfer (real processes, SIGKILL) leak nothing on the exporting side, and
the fetcher falls through unusable backends and reports an exporter that is gone.

The exporting side here is what a prefill worker runs: an export region, its lease table (whose
frees clear the tickets) and the tcp block server, in this test's event loop.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import LeaseExpired, PeerGone
from kvrelay.transport.kv.base import BlockTarget, host_identity
from kvrelay.transport.kv.fetch import KVFetcher
from kvrelay.transport.kv.leases import LeaseTable
from kvrelay.transport.kv.region import ExportRegion, new_region_name
from kvrelay.transport.kv.shm import ShmReader
from kvrelay.transport.kv.tcp import TcpReader
from kvrelay.transport.kv.tcp_server import BlockServer, BlockServerConfig

# 1 MiB blocks: a 48-block export is far more than the socket buffers hold
LAYOUT = KVLayout(num_layers=4, num_kv_heads=1, head_dim=8, block_size=4, dtype="float32", page_elems=65536)
NUM_BLOCKS = 64


class Exporter:
    def __init__(self, directory: Path) -> None:
        self.region = ExportRegion.create(new_region_name(), LAYOUT, NUM_BLOCKS, directory)
        self.region.data.copy_(torch.randn(NUM_BLOCKS, 4, 65536))
        self.leases = LeaseTable(NUM_BLOCKS, on_free=self.region.clear_tickets)
        self.server = BlockServer([self.region], BlockServerConfig(chunk_kb=256))
        self.next_ticket = 1

    def export(self, n: int, lease_ms: int = 60_000) -> KVDescriptor:
        ticket, self.next_ticket = self.next_ticket, self.next_ticket + 1
        expires = int(time.time() * 1000) + lease_ms
        blocks = self.leases.allocate(n, ticket, expires)
        self.region.set_tickets(blocks, ticket)
        return KVDescriptor(
            backend="shm",
            worker_id="p",
            host=host_identity(),
            region=self.region.name,
            block_ids=blocks,
            num_tokens=4 * n,
            ticket=ticket,
            lease_expires_ms=expires,
            layout=LAYOUT,
            endpoint=self.server.endpoint,
            fallbacks=["tcp"],
        )

    def assert_nothing_held(self) -> None:
        assert (self.leases.free_blocks, self.leases.active) == (NUM_BLOCKS, 0)
        assert int(self.region.tickets.count_nonzero()) == 0


@pytest.fixture
async def exporter(tmp_path: Path):
    exp = Exporter(tmp_path)
    await exp.server.start()
    yield exp
    await exp.server.close()
    exp.region.close()


def target(n: int) -> BlockTarget:
    return BlockTarget(kv=torch.zeros(n, 4, 65536), layout=LAYOUT)


async def child_says(proc: subprocess.Popen, want: str, timeout: float = 120.0) -> None:
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    assert line.strip() == want, (
        f"child said {line!r}; stderr: {proc.stderr.read()[-2000:] if proc.poll() else ''}"
    )


def spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_killed_tcp_reader_mid_transfer_leaks_nothing(exporter: Exporter) -> None:
    desc = exporter.export(48)
    # a decode-side reader: asks for 48 MiB, takes the first MiB, then stops reading
    proc = spawn(f"""
        import socket, sys
        from kvrelay.schemas.messages import KVDescriptor
        from kvrelay.transport.kv.tcp import RESP, encode_request, parse_endpoint
        desc = KVDescriptor.from_mapping({desc.to_mapping()!r})
        s = socket.create_connection(parse_endpoint(desc.endpoint))
        s.sendall(encode_request(desc, 0, False))
        got = 0
        while got < RESP.size + (1 << 20):
            got += len(s.recv(65536))
        print("mid-transfer", flush=True)
        sys.stdin.read()
    """)
    try:
        await child_says(proc, "mid-transfer")
        assert exporter.server.open_connections == 1
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)
        await exporter.server.wait_idle(30)  # the server dropped the connection ...
        assert exporter.server.counters["dropped"] == 1 and exporter.server.counters["served"] == 0
    finally:
        proc.kill()
        proc.wait(30)
    # ... and the lease runs out on the exporter's clock: every block is free again
    assert exporter.leases.expire(desc.lease_expires_ms) == [desc.ticket]
    exporter.assert_nothing_held()
    with pytest.raises(LeaseExpired):  # a late reader of the dead export gets nothing
        await asyncio.to_thread(TcpReader().read, desc, target(48), list(range(48)), timeout_s=10)
    # the server keeps serving
    again = exporter.export(8)
    tgt = target(8)
    reader = TcpReader()
    await asyncio.to_thread(reader.read, again, tgt, list(range(8)), timeout_s=10)
    reader.close()
    assert torch.equal(tgt.kv, exporter.region.data[again.block_ids[0] : again.block_ids[0] + 8])
    exporter.leases.release(again.ticket)
    exporter.assert_nothing_held()


async def test_killed_shm_reader_after_attaching_leaks_nothing(exporter: Exporter, tmp_path: Path) -> None:
    desc = exporter.export(16)
    proc = spawn(f"""
        import sys, torch
        from pathlib import Path
        from kvrelay.schemas.messages import KVDescriptor
        from kvrelay.transport.kv.base import BlockTarget
        from kvrelay.transport.kv.shm import ShmReader
        desc = KVDescriptor.from_mapping({desc.to_mapping()!r})
        reader = ShmReader(Path({str(tmp_path)!r}))
        reader.read(desc, BlockTarget(torch.zeros(16, 4, 65536), desc.layout), list(range(16)), timeout_s=30)
        print("attached", flush=True)  # the region stays mapped in this process
        sys.stdin.read()
    """)
    try:
        await child_says(proc, "attached")
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)
    finally:
        proc.kill()
        proc.wait(30)
    assert exporter.leases.expire(desc.lease_expires_ms) == [desc.ticket]
    exporter.assert_nothing_held()
    with pytest.raises(LeaseExpired):
        ShmReader(tmp_path).read(desc, target(16), list(range(16)), timeout_s=10)


async def test_fetch_falls_through_to_tcp_and_reports_a_gone_exporter(
    exporter: Exporter, tmp_path: Path
) -> None:
    desc = exporter.export(4)
    # the reader looks for regions in another folder: it cannot map this one, tcp still reaches it
    fetcher = KVFetcher({"shm": ShmReader(tmp_path / "elsewhere"), "tcp": TcpReader()}, ["shm", "tcp"])
    tgt = target(4)
    got = await asyncio.to_thread(fetcher.read, desc, tgt, [0, 1, 2, 3], timeout_s=10)
    assert got.backend == "tcp" and got.skipped == (("shm", "peer_gone"),)
    assert torch.equal(tgt.kv, exporter.region.data[desc.block_ids[0] : desc.block_ids[0] + 4])
    # the exporter goes away: region unlinked, server closed -> PeerGone after trying both
    await exporter.server.close()
    exporter.region.close()
    fetcher2 = KVFetcher({"shm": ShmReader(tmp_path), "tcp": TcpReader()}, ["shm", "tcp"])
    with pytest.raises(PeerGone) as info:
        await asyncio.to_thread(fetcher2.read, desc, target(4), [0, 1, 2, 3], timeout_s=10)
    assert info.value.skipped == (("shm", "peer_gone"),)  # and then tcp, the error raised
