"""Notices from the connector (inside vLLM's EngineCore process) to the engine's main process.

One UNIX datagram socket per engine, bound by the engine (``NotifyReceiver``) in a private
temporary folder. The connector (``NotifySender``) sends at most one datagram per engine step
holding every notice of that step: msgpack ``{"v": 1, "n": [Notice, ...]}``, at most
``MAX_NOTICES`` notices per datagram (more are split over several). No polling: the receiver
is an event-loop reader callback.

Bounds: the kernel queue of the socket is the only buffer; a sender blocked more than
``SEND_TIMEOUT_S`` drops the datagram and counts it (the engine then times the request out).
The receiver's pending map holds one entry per export or import in flight, which the engines
bound (region size, engine slots); past ``max_pending`` ``expect`` raises ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Hashable
from pathlib import Path

import msgpack

from kvrelay.base.logs import get_logger
from kvrelay.schemas.errors import SchemaError
from kvrelay.workers.vllm_engine.params import Notice

log = get_logger(__name__)

VERSION = 1
MAX_NOTICES = 128
MAX_DATAGRAM = 64 * 1024
SEND_TIMEOUT_S = 2.0


def notice_key(n: Notice) -> tuple[str, int]:
    return (n.kind, n.ticket if n.kind == "export" else n.nonce)


class NotifySender:
    """Sends notices to one receiver; thread-safe. Used inside vLLM's process."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.settimeout(SEND_TIMEOUT_S)
        self.dropped = 0

    def send(self, notices: list[Notice]) -> None:
        for i in range(0, len(notices), MAX_NOTICES):
            part = notices[i : i + MAX_NOTICES]
            data = msgpack.packb({"v": VERSION, "n": [n.to_mapping() for n in part]}, use_bin_type=True)
            with self._lock:
                try:
                    self._sock.sendto(data, self._path)
                except OSError as exc:  # receiver gone, or blocked past the timeout
                    self.dropped += len(part)
                    log.warning("notice_dropped", path=self._path, count=len(part), error=repr(exc))

    def close(self) -> None:
        self._sock.close()


class NotifyReceiver:
    """Binds the socket and resolves futures by notice key.

    ``on_notice(notice, matched)`` sees every notice (for counters), ``matched`` telling whether
    a waiter took it.
    """

    def __init__(
        self, on_notice: Callable[[Notice, bool], None] | None = None, max_pending: int = 65536
    ) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="kvrelay-"))
        self.path = str(self._dir / "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.setblocking(False)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._on_notice = on_notice
        self._max_pending = max_pending
        self._pending: dict[Hashable, asyncio.Future[Notice]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.bad = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self._on_readable)

    def expect(self, key: Hashable) -> asyncio.Future[Notice]:
        """A future for the notice with this key (register before the request is submitted)."""
        if self._loop is None:
            raise RuntimeError("receiver not started")
        if len(self._pending) >= self._max_pending:
            raise RuntimeError(f"{len(self._pending)} notices awaited already")
        if key in self._pending:
            raise ValueError(f"a notice for {key!r} is awaited already")
        fut: asyncio.Future[Notice] = self._loop.create_future()
        self._pending[key] = fut
        return fut

    def forget(self, key: Hashable) -> None:
        fut = self._pending.pop(key, None)
        if fut is not None and not fut.done():
            fut.cancel()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _on_readable(self) -> None:
        for _ in range(64):  # bounded work per callback; the reader fires again if more wait
            try:
                data = self._sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("notify_recv_failed", error=repr(exc))
                return
            for notice in self._decode(data):
                fut = self._pending.pop(notice_key(notice), None)
                matched = fut is not None and not fut.done()
                if matched:
                    fut.set_result(notice)
                if self._on_notice is not None:
                    self._on_notice(notice, matched)

    def _decode(self, data: bytes) -> list[Notice]:
        try:
            env = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            self.bad += 1
            log.warning("notify_bad_datagram", error=repr(exc))
            return []
        if not isinstance(env, dict) or env.get("v") != VERSION or not isinstance(env.get("n"), list):
            self.bad += 1
            log.warning("notify_bad_datagram", error="not a notice batch")
            return []
        out = []
        for m in env["n"]:
            try:
                out.append(Notice.from_mapping(m))
            except SchemaError as exc:
                self.bad += 1
                log.warning("notify_bad_notice", error=str(exc))
        return out

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._sock.fileno())
            except (RuntimeError, ValueError):
                pass  # loop already closed
        self._sock.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()
        shutil.rmtree(self._dir, ignore_errors=True)
