"""TcpReader + BlockServer: KV blocks over real loopback TCP, with the ticket and checksum checks."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import ChecksumMismatch, LayoutMismatch, LeaseExpired, PeerGone, TransferTimeout
from kvrelay.transport.kv.base import BlockTarget
from kvrelay.transport.kv.copy import checksum
from kvrelay.transport.kv.region import ExportRegion, new_region_name
from kvrelay.transport.kv.tcp import RESP, RESP_MAGIC, STATUS_OF, TcpReader, encode_request, parse_endpoint
from kvrelay.transport.kv.tcp_server import BlockServer, BlockServerConfig

LAYOUT = KVLayout(num_layers=3, num_kv_heads=1, head_dim=8, block_size=4, dtype="bfloat16", page_elems=64)
TICKET = 4242


@pytest.fixture
def region(tmp_path: Path):
    r = ExportRegion.create(new_region_name(), LAYOUT, num_blocks=32, directory=tmp_path)
    r.data.copy_(torch.randn(32, 3, 64).to(torch.bfloat16))
    yield r
    r.close()


@pytest.fixture
async def server(region: ExportRegion):
    srv = BlockServer([region], BlockServerConfig(chunk_kb=16, max_connections=4))
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
def reader():
    rd = TcpReader(max_peers=2, max_idle_per_peer=2)
    yield rd
    rd.close()


def export(
    region: ExportRegion, server: BlockServer, blocks: list[int], num_tokens: int, **kw
) -> KVDescriptor:
    region.set_tickets(blocks, TICKET)
    fields = dict(
        backend="shm",
        worker_id="p1",
        host="elsewhere",
        region=region.name,
        block_ids=blocks,
        num_tokens=num_tokens,
        ticket=TICKET,
        lease_expires_ms=int(time.time() * 1000) + 60_000,
        layout=LAYOUT,
        endpoint=server.endpoint,
        fallbacks=["tcp"],
    )
    fields.update(kw)
    return KVDescriptor(**fields)


def layer_major(num_blocks: int = 40) -> BlockTarget:
    flat = torch.zeros(3 * num_blocks * 64, dtype=torch.bfloat16)
    kv = torch.as_strided(flat, (num_blocks, 3, 64), (64, num_blocks * 64, 1))  # like vLLM's CPU cache
    return BlockTarget(kv=kv, layout=LAYOUT)


async def read(reader: TcpReader, *args, **kw):
    kw.setdefault("timeout_s", 10)
    return await asyncio.to_thread(reader.read, *args, **kw)


async def test_tcp_read_copies_blocks_into_layer_major_cache(region, server, reader) -> None:
    src = [3, 4, 5, 9, 10]
    desc = export(region, server, src, num_tokens=19)
    tgt = layer_major()
    dst = [7, 8, 20, 21, 30]
    res = await read(reader, desc, tgt, dst)
    assert (res.blocks, res.nbytes) == (5, 5 * 3 * 64 * 2)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(tgt.kv[d], region.data[s])
    untouched = [b for b in range(40) if b not in dst]
    assert float(tgt.kv[untouched].float().abs().sum()) == 0.0
    assert server.counters["served"] == 1 and server.counters["bytes"] == res.nbytes


async def test_tcp_read_skips_leading_blocks_and_reuses_the_connection(region, server, reader) -> None:
    desc = export(region, server, [0, 1, 2, 3], num_tokens=16, checksum=checksum(region.data, [0, 1, 2, 3]))
    tgt = layer_major()
    await read(reader, desc, tgt, [5, 6], first_block=2)  # the server checks the whole export's crc
    assert torch.equal(tgt.kv[5], region.data[2]) and torch.equal(tgt.kv[6], region.data[3])
    await read(reader, desc, tgt, [10, 11, 12, 13])  # the reader checks the crc of what it got
    assert torch.equal(tgt.kv[13], region.data[3])
    assert server.counters["connections"] == 1 and reader.idle_connections == 1


async def test_tcp_read_contiguous_target_is_one_span(region, server, reader) -> None:
    desc = export(region, server, list(range(8, 24)), num_tokens=64)
    kv = torch.zeros(16, 3, 64, dtype=torch.bfloat16)
    await read(reader, desc, BlockTarget(kv=kv, layout=LAYOUT), list(range(16)))
    assert torch.equal(kv, region.data[8:24])


async def test_tcp_read_released_blocks_is_lease_expired(region, server, reader) -> None:
    desc = export(region, server, [1, 2], num_tokens=8)
    region.clear_tickets([2])
    with pytest.raises(LeaseExpired):
        await read(reader, desc, layer_major(), [0, 1])
    region.set_tickets([2], TICKET + 1)  # reused by another export
    with pytest.raises(LeaseExpired):
        await read(reader, desc, layer_major(), [0, 1])
    assert reader.idle_connections == 1  # an error answer keeps the connection in step


async def test_tcp_read_corrupted_byte_is_checksum_mismatch(region, server, reader) -> None:
    blocks = [4, 5, 6]
    desc = export(region, server, blocks, num_tokens=12, checksum=checksum(region.data, blocks))
    region.data.view(torch.uint8)[5, 1, 17] ^= 0x40  # one flipped bit after the export
    with pytest.raises(ChecksumMismatch):  # the reader's check (whole export)
        await read(reader, desc, layer_major(), [0, 1, 2])
    with pytest.raises(ChecksumMismatch):  # the server's check (partial read)
        await read(reader, desc, layer_major(), [1, 2], first_block=1)


async def test_tcp_read_errors_are_typed(region, server, reader, tmp_path: Path) -> None:
    desc = export(region, server, [1], num_tokens=4)
    with pytest.raises(PeerGone):  # no such region on that server
        await read(reader, desc.replace(region="kvrelay-other"), layer_major(), [0])
    with pytest.raises(PeerGone):  # the exporter does not serve tcp
        await read(reader, desc.replace(fallbacks=[]), layer_major(), [0])
    with pytest.raises(LayoutMismatch):
        await read(reader, desc.replace(block_ids=[999]), layer_major(), [0])
    with pytest.raises(LeaseExpired):
        await read(reader, desc.replace(lease_expires_ms=1), layer_major(), [0])
    with pytest.raises(TransferTimeout):
        await read(reader, desc, layer_major(), [0], timeout_s=-1)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(PeerGone):  # nobody listens there
        await read(reader, desc.replace(endpoint=f"127.0.0.1:{port}"), layer_major(), [0])


def test_tcp_parse_endpoint() -> None:
    assert parse_endpoint("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_endpoint("[::1]:80") == ("::1", 80)
    for bad in ("nohost", ":80", "h:0", "h:99999", "h:x"):
        with pytest.raises(PeerGone):
            parse_endpoint(bad)


async def test_tcp_server_refuses_connections_past_its_bound(region, server) -> None:
    loop = asyncio.get_running_loop()
    held = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", int(server.endpoint.rsplit(":", 1)[1])))
        held.append(s)
    try:
        extra = socket.create_connection(("127.0.0.1", int(server.endpoint.rsplit(":", 1)[1])))
        extra.settimeout(5)
        head = await loop.run_in_executor(None, extra.recv, RESP.size)
        magic, status, _, _ = RESP.unpack(head)
        assert magic == RESP_MAGIC and status == STATUS_OF["busy"]
        extra.close()
        assert server.counters["refused"] == 1
    finally:
        for s in held:
            s.close()


async def test_tcp_server_closes_malformed_requests_and_keeps_serving(region, server, reader) -> None:
    host, port = parse_endpoint(server.endpoint)
    bad = socket.create_connection((host, port))
    bad.settimeout(5)
    bad.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 64)
    head = await asyncio.to_thread(bad.recv, RESP.size)
    _, status, mlen, _ = RESP.unpack(head)
    assert status == STATUS_OF["bad_request"]
    await asyncio.to_thread(bad.recv, mlen)
    try:
        rest = await asyncio.to_thread(bad.recv, 1)
    except ConnectionResetError:  # closed with our junk unread: the kernel resets
        rest = b""
    assert rest == b""  # closed by the server
    bad.close()
    desc = export(region, server, [2], num_tokens=4)
    await read(reader, desc, layer_major(), [0])
    assert encode_request(desc, 0, False)[:4] == b"KVRQ"
