"""The TCP KV reader (any two hosts) and the wire format it shares with ``tcp_server.BlockServer``.

One request per read, many blocks per response, no per-block round trip:

    request   REQ header | region name | uint32 block id x n_ids   (the export's ids; the server
                                                                     sends ids[first:])
    response  RESP header (status, message length, data bytes) | message  -- status != 0: the end
              RESP header (ok) | data: the blocks in order, each all layers | TRAILER (status)

The server checks the blocks' tickets before sending and again after the last byte left (the
seqlock of ``region.py`` across the wire): a lease lost meanwhile makes the trailer say
``lease_expired`` and the reader discards what it received. Integrity (``desc.checksum``): a
reader fetching the whole export checks the crc32 of what it received; for a partial fetch
(``first_block`` > 0, a prefix-cache hit) the server checks the whole export before sending.

``TcpReader`` runs in the decode connector's worker threads with blocking sockets: bytes go
straight from the socket into the destination cache pages (``recvmsg_into`` over the pages,
merged where contiguous), nothing is staged. Connections are pooled per endpoint: at most
``max_peers`` endpoints (least recently used closed first) and ``max_idle_per_peer`` idle
connections each (more are closed); a connection that saw an error is never reused.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence

from kvrelay.schemas.messages import KVDescriptor
from kvrelay.transport.errors import (
    ChecksumMismatch,
    KVTransferError,
    LayoutMismatch,
    LeaseExpired,
    PeerGone,
    TransferTimeout,
)
from kvrelay.transport.kv.base import (
    BlockTarget,
    KVReader,
    ReadResult,
    check_read,
    offered,
    page_spans,
)
from kvrelay.transport.kv.region import layout_fingerprint

VERSION = 1
# magic, version, flags, ticket, layout fingerprint, expected checksum, first, n_ids, name length
REQ = struct.Struct("<4sHHQQQIIH")
REQ_MAGIC = b"KVRQ"
# magic, status, message length, data bytes
RESP = struct.Struct("<4sHHQ")
RESP_MAGIC = b"KVRS"
# magic, status
TRAILER = struct.Struct("<4sHH")
TRAILER_MAGIC = b"KVRT"
FLAG_CHECKSUM = 1
MAX_IDS = 1 << 16
MAX_NAME = 128
MAX_MESSAGE = 1024
IOV_BATCH = 64  # destination spans per recvmsg_into call
RCVBUF = 4 << 20

OK = 0
# status codes on the wire <-> the reader's errors
STATUS_ERRORS: dict[int, type[KVTransferError]] = {
    1: PeerGone,  # no such region here
    2: LeaseExpired,
    3: LayoutMismatch,
    4: ChecksumMismatch,
    5: PeerGone,  # busy: connection or in-flight limit reached
    6: LayoutMismatch,  # malformed request
}
STATUS_OF = {"peer_gone": 1, "lease_expired": 2, "layout_mismatch": 3, "checksum_mismatch": 4, "busy": 5,
             "bad_request": 6}


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ``PeerGone`` when malformed."""
    host, sep, port = endpoint.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PeerGone(f"bad tcp endpoint {endpoint!r}")
    return host, int(port)


def encode_request(desc: KVDescriptor, first: int, verify: bool) -> bytes:
    name = desc.region.encode()
    if len(name) > MAX_NAME or len(desc.block_ids) > MAX_IDS:
        raise LayoutMismatch("descriptor too large for the tcp wire format")
    flags = FLAG_CHECKSUM if verify and desc.checksum is not None else 0
    head = REQ.pack(REQ_MAGIC, VERSION, flags, desc.ticket, layout_fingerprint(desc.layout),
                    desc.checksum or 0, first, len(desc.block_ids), len(name))
    return head + name + struct.pack(f"<{len(desc.block_ids)}I", *desc.block_ids)


def _views(spans: list[tuple[int, int]]) -> list[memoryview]:
    return [memoryview((ctypes.c_char * n).from_address(a)).cast("B") for a, n in spans]


class _Deadline:
    def __init__(self, timeout_s: float, what: str) -> None:
        self.at = time.monotonic() + timeout_s
        self.what = what

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TransferTimeout(f"{self.what} passed its timeout")
        return left


def recv_exact(sock: socket.socket, n: int, deadline: _Deadline) -> bytes:
    buf = bytearray(n)
    recv_into(sock, [memoryview(buf)], deadline)
    return bytes(buf)


def recv_into(sock: socket.socket, views: Sequence[memoryview], deadline: _Deadline) -> int:
    """Fill ``views`` in order from ``sock``; returns the bytes read."""
    i, off, total = 0, 0, 0
    while i < len(views):
        sock.settimeout(deadline.left())
        batch = [views[i][off:], *views[i + 1 : i + IOV_BATCH]]
        n = sock.recvmsg_into(batch)[0]
        if n == 0:
            raise PeerGone("the block server closed the connection")
        total += n
        while i < len(views) and n >= len(views[i]) - off:
            n -= len(views[i]) - off
            i, off = i + 1, 0
        off += n
    return total


class TcpReader(KVReader):
    backend = "tcp"

    def __init__(
        self, max_peers: int = 16, max_idle_per_peer: int = 4, connect_timeout_s: float = 5.0
    ) -> None:
        if max_peers < 1 or max_idle_per_peer < 0:
            raise ValueError("max_peers >= 1 and max_idle_per_peer >= 0")
        self._max_peers = max_peers
        self._max_idle = max_idle_per_peer
        self._connect_timeout_s = connect_timeout_s
        self._idle: OrderedDict[str, list[socket.socket]] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

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
        deadline = _Deadline(timeout_s, f"tcp read of {len(dst_block_ids)} blocks")
        if self.backend in offered(desc) and not desc.endpoint:
            raise PeerGone("the descriptor names no tcp endpoint")
        check_read(desc, target, len(dst_block_ids), first_block, self.backend)
        deadline.left()
        views = _views(page_spans(target, dst_block_ids))
        want = len(dst_block_ids) * target.kv.shape[1] * target.kv.shape[2] * target.kv.element_size()
        whole = first_block == 0 and len(dst_block_ids) == len(desc.block_ids)
        request = encode_request(desc, first_block, verify=not whole)
        sock = self._checkout(desc.endpoint, deadline)
        reusable = False
        try:
            sock.settimeout(deadline.left())
            sock.sendall(request)
            magic, status, mlen, nbytes = RESP.unpack(recv_exact(sock, RESP.size, deadline))
            if magic != RESP_MAGIC:
                raise PeerGone(f"{desc.endpoint} is not a kvrelay block server")
            if status != OK:
                message = recv_exact(sock, mlen, deadline).decode(errors="replace") if mlen else ""
                reusable = True
                raise STATUS_ERRORS.get(status, PeerGone)(f"block server {desc.endpoint}: {message}")
            if nbytes != want:
                raise LayoutMismatch(f"block server sends {nbytes} bytes, {want} expected")
            recv_into(sock, views, deadline)
            magic, status, _ = TRAILER.unpack(recv_exact(sock, TRAILER.size, deadline))
            if magic != TRAILER_MAGIC:
                raise PeerGone(f"{desc.endpoint} broke the protocol (bad trailer)")
            reusable = True
            if status != OK:
                error = STATUS_ERRORS.get(status, PeerGone)
                raise error(f"ticket {desc.ticket} lost its blocks during the read")
        except (socket.timeout, TimeoutError) as exc:
            raise TransferTimeout(f"tcp read from {desc.endpoint} passed {timeout_s} s") from exc
        except OSError as exc:
            raise PeerGone(f"block server {desc.endpoint}: {exc}") from exc
        finally:
            for v in views:
                v.release()
            if reusable:
                self._checkin(desc.endpoint, sock)
            else:
                sock.close()
        if whole and desc.checksum is not None:
            self._verify(desc, target, dst_block_ids)
        return ReadResult(blocks=len(dst_block_ids), nbytes=want, seconds=time.monotonic() - t0)

    @staticmethod
    def _verify(desc: KVDescriptor, target: BlockTarget, dst_block_ids: Sequence[int]) -> None:
        crc = 0
        for a, n in page_spans(target, dst_block_ids):
            crc = zlib.crc32((ctypes.c_char * n).from_address(a), crc)
        if crc != desc.checksum:
            raise ChecksumMismatch(f"crc32 {crc:#010x} of the bytes received != {desc.checksum:#010x}")

    # -- connections -------------------------------------------------------------------------
    def _checkout(self, endpoint: str, deadline: _Deadline) -> socket.socket:
        with self._lock:
            if self._closed:
                raise PeerGone("the tcp reader is closed")
            idle = self._idle.get(endpoint)
            if idle:
                self._idle.move_to_end(endpoint)
                return idle.pop()
        host, port = parse_endpoint(endpoint)
        try:
            timeout = min(self._connect_timeout_s, deadline.left())
            sock = socket.create_connection((host, port), timeout=timeout)
        except (socket.timeout, TimeoutError) as exc:
            raise PeerGone(f"cannot connect to block server {endpoint}: timed out") from exc
        except OSError as exc:
            raise PeerGone(f"cannot connect to block server {endpoint}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        return sock

    def _checkin(self, endpoint: str, sock: socket.socket) -> None:
        drop: list[socket.socket] = []
        with self._lock:
            idle = self._idle.setdefault(endpoint, [])
            self._idle.move_to_end(endpoint)
            if self._closed or len(idle) >= self._max_idle:
                drop.append(sock)
            else:
                idle.append(sock)
            while len(self._idle) > self._max_peers:
                drop.extend(self._idle.popitem(last=False)[1])
        for s in drop:
            s.close()

    @property
    def idle_connections(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = [s for v in self._idle.values() for s in v]
            self._idle.clear()
        for s in socks:
            s.close()
