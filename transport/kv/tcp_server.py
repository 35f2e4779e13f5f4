"""The block server: serves export-region blocks to ``tcp.TcpReader`` over TCP (asyncio).

Runs in the event loop of the process that owns the region (the prefill worker's main process)
on non-blocking sockets (``loop.sock_*``): region bytes go from the mapping straight into the
kernel with ``sock_sendall``, never into a user-space buffer. The wire format and the ticket
checks are described in ``tcp.py``.

Bounds, and what happens past them:
- ``max_connections`` open connections: one more is answered ``busy`` and closed.
- ``max_inflight_mb`` of block data being sent at once, in ``chunk_kb`` chunks: a chunk waits
  for a slot (push back; the TCP window pushes back on the reader in turn).
- ``request_timeout_s`` per request, from its first byte to the trailer: past it the connection
  is dropped (the reader sees a timeout or a closed connection); ``idle_timeout_s`` between
  requests: the connection is closed.
- ``MAX_IDS`` block ids and ``MAX_NAME`` bytes of region name per request (``tcp.py``): a bigger
  request is answered ``bad_request`` and the connection closed.
A reader that dies mid-transfer (killed, network gone) only ends its own connection: the send
fails, the connection is dropped and counted (``dropped``), the server keeps serving; the
blocks stay leased until released or expired, as for any reader.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Sequence

from kvrelay.base.logs import get_logger
from kvrelay.base.tasks import cancel_and_wait
from kvrelay.schemas.struct import Struct, limit, typed
from kvrelay.transport.errors import TransportError
from kvrelay.transport.kv.copy import block_runs, checksum
from kvrelay.transport.kv.region import ExportRegion, layout_fingerprint
from kvrelay.transport.kv.tcp import (
    FLAG_CHECKSUM,
    MAX_IDS,
    MAX_NAME,
    OK,
    REQ,
    REQ_MAGIC,
    RESP,
    RESP_MAGIC,
    STATUS_OF,
    TRAILER,
    TRAILER_MAGIC,
    VERSION,
)

log = get_logger(__name__)

SNDBUF = 4 << 20  # kernel send buffer per connection: fewer wake-ups of the loop per request


@typed
class BlockServerConfig(Struct):
    host: str = limit("127.0.0.1", max_len=256)
    port: int = limit(0, min=0, max=65535)  # 0 = a free port
    max_connections: int = limit(64, min=1, max=65536)
    max_inflight_mb: int = limit(64, min=1, max=1 << 20)
    chunk_kb: int = limit(4096, min=16, max=1 << 20)
    request_timeout_s: float = limit(30.0, min=0.1, max=3600.0)
    idle_timeout_s: float = limit(300.0, min=0.1, max=86400.0)


class _Refused(Exception):
    def __init__(self, status: str, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.close = status, close


class BlockServer:
    """Serves the blocks of ``regions`` (by name). ``await start()`` -> endpoint; ``await close()``."""

    def __init__(self, regions: Sequence[ExportRegion], cfg: BlockServerConfig | None = None) -> None:
        self.cfg = cfg or BlockServerConfig()
        self._regions = {r.name: r for r in regions}
        self._sock: socket.socket | None = None
        self._accept: asyncio.Task[None] | None = None
        self._conns: dict[asyncio.Task[None], socket.socket] = {}
        self._idle = asyncio.Event()  # set while no connection is open
        self._idle.set()
        self._closing = False
        slots = max(1, (self.cfg.max_inflight_mb << 10) // self.cfg.chunk_kb)
        self._slots = asyncio.Semaphore(slots)
        self.endpoint = ""
        self.counters: dict[str, int] = dict.fromkeys(
            ("connections", "refused", "requests", "served", "bytes", "errors", "dropped", "lease_lost"), 0
        )

    async def start(self) -> str:
        """Bind and start accepting; returns ``host:port`` (the port chosen when 0)."""
        host, port = self.cfg.host, self.cfg.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(min(self.cfg.max_connections, 1024))
            sock.setblocking(False)
        except OSError as exc:
            raise TransportError(f"block server cannot listen on {host}:{port}: {exc}") from exc
        self._sock = sock
        bound = sock.getsockname()
        advertised = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
        self.endpoint = f"[{advertised}]:{bound[1]}" if ":" in advertised else f"{advertised}:{bound[1]}"
        self._accept = asyncio.get_running_loop().create_task(self._accept_loop(), name="kv-block-server")
        log.info("kv_block_server_listening", endpoint=self.endpoint, regions=list(self._regions))
        return self.endpoint

    async def close(self) -> None:
        """Stop accepting, drop every connection, wait for their tasks. Idempotent.

        Connections are shut down before their tasks are cancelled, so a task whose cancel is
        swallowed (``kvrelay.base.tasks``) still finds its socket closed at its next wait."""
        self._closing = True
        tasks = [t for t in (self._accept, *self._conns) if t is not None]
        self._accept = None
        for conn in list(self._conns.values()):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected any more
        await cancel_and_wait(tasks)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def wait_idle(self, timeout: float) -> None:
        """Until no connection is open (``asyncio.TimeoutError`` after ``timeout``)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    # -- connections ---------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("kv_block_server_accept_failed", error=repr(exc))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            if len(self._conns) >= self.cfg.max_connections:
                self.counters["refused"] += 1
                loop.create_task(self._refuse(conn))
                continue
            self.counters["connections"] += 1
            task = loop.create_task(self._serve(conn))
            self._conns[task] = conn
            self._idle.clear()
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._conns.pop(task, None)
        if not self._conns:
            self._idle.set()

    async def _refuse(self, conn: socket.socket) -> None:
        try:
            await asyncio.wait_for(self._error(conn, "busy", "too many connections"), 1.0)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            conn.close()

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closing:
                try:
                    head = await asyncio.wait_for(_recv_exact(loop, conn, REQ.size), self.cfg.idle_timeout_s)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                    return  # the reader closed its end, or went quiet
                self.counters["requests"] += 1
                await asyncio.wait_for(self._request(loop, conn, head), self.cfg.request_timeout_s)
        except _Refused as exc:  # malformed: answered, then closed (the stream is out of step)
            self.counters["errors"] += 1
            log.warning("kv_block_request_refused", status=exc.status, reason=str(exc))
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            self.counters["dropped"] += 1
            log.info("kv_block_connection_dropped", error=repr(exc))
        finally:
            conn.close()

    # -- one request ---------------------------------------------------------------------------
    async def _request(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, head: bytes) -> None:
        magic, version, flags, ticket, fp, expected, first, n_ids, name_len = REQ.unpack(head)
        if magic != REQ_MAGIC or version != VERSION or n_ids > MAX_IDS or name_len > MAX_NAME:
            await self._error(conn, "bad_request", "not a kvrelay block request of this version")
            raise _Refused("bad_request", "malformed request header", close=True)
        body = await _recv_exact(loop, conn, name_len + 4 * n_ids)
        name = body[:name_len].decode(errors="replace")
        ids = list(struct.unpack_from(f"<{n_ids}I", body, name_len))
        try:
            region = self._check(name, fp, ids, first, ticket)
            if flags & FLAG_CHECKSUM:
                await self._verify(region, ids, ticket, expected)
        except _Refused as exc:
            self.counters["errors"] += 1
            await self._error(conn, exc.status, str(exc))
            return
        send = ids[first:]
        nbytes = len(send) * region.block_nbytes
        await loop.sock_sendall(conn, RESP.pack(RESP_MAGIC, OK, 0, nbytes))
        await self._send_blocks(loop, conn, region, send)
        ok = region.tickets_match(ids, ticket)  # after the last byte left: the seqlock's second check
        if not ok:
            self.counters["lease_lost"] += 1
        status = OK if ok else STATUS_OF["lease_expired"]
        await loop.sock_sendall(conn, TRAILER.pack(TRAILER_MAGIC, status, 0))
        if ok:
            self.counters["served"] += 1
            self.counters["bytes"] += nbytes

    def _check(self, name: str, fp: int, ids: list[int], first: int, ticket: int) -> ExportRegion:
        region = self._regions.get(name)
        if region is None or region.closed:
            raise _Refused("peer_gone", f"no export region {name!r} here")
        if fp != layout_fingerprint(region.layout):
            raise _Refused("layout_mismatch", f"region {name!r} holds another KV layout")
        if not ids or first >= len(ids) or any(b >= region.num_blocks for b in ids):
            raise _Refused("layout_mismatch", f"bad block ids or first block {first} for region {name!r}")
        if not region.tickets_match(ids, ticket):
            raise _Refused("lease_expired", f"ticket {ticket} no longer holds its blocks")
        return region

    @staticmethod
    async def _verify(region: ExportRegion, ids: list[int], ticket: int, expected: int) -> None:
        crc = await asyncio.to_thread(checksum, region.data, ids)  # crc32 runs without the GIL
        if not region.tickets_match(ids, ticket):
            raise _Refused("lease_expired", f"ticket {ticket} lost its blocks during the check")
        if crc != expected:
            raise _Refused("checksum_mismatch", f"crc32 {crc:#010x} != exported {expected:#010x}")

    async def _send_blocks(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, region: ExportRegion, ids: list[int]
    ) -> None:
        chunk = self.cfg.chunk_kb << 10
        for start, _, count in block_runs(ids, ids):
            with region.block_bytes(start, count) as run:
                for at in range(0, len(run), chunk):
                    async with self._slots:
                        await loop.sock_sendall(conn, run[at : at + chunk])

    async def _error(self, conn: socket.socket, status: str, message: str) -> None:
        msg = message.encode()[: 1024]
        head = RESP.pack(RESP_MAGIC, STATUS_OF[status], len(msg), 0)
        await asyncio.get_running_loop().sock_sendall(conn, head + msg)


async def _recv_exact(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(conn, view[got:])
        if k == 0:
            raise asyncio.IncompleteReadError(bytes(buf[:got]), n)
        got += k
    return bytes(buf)
