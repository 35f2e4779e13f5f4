"""The nixl KV backend: NVIDIA NIXL (UCX: RDMA across nodes, shared memory or TCP within one) behind
the same ``KVReader`` interface.

Optional: ``pip install 'kvrelay[nixl]'`` (PyPI ``nixl-cu12`` / ``nixl-cu13``, 1.5.x; the ``nixl``
meta package pulls both). Without it ``nixl_available()`` says why and ``NotAvailable`` is raised.
NIXL's own descriptor serialisation (pickle) is never used: kvrelay builds the remote descriptor
lists itself from the exporter's published addresses.

Exporter: ``NixlExporter`` registers a region's whole memory (tickets + data, ``DRAM`` for an
``ExportRegion``, ``VRAM`` for a ``CudaExportRegion``) with a NIXL agent that answers metadata
requests on ``port`` (NIXL's listener thread) and publishes the descriptor's ``region`` string::

    nixl:1|<agent>|<host>|<port>|<DRAM or VRAM>|<device>|<base address>|<num_blocks>|<data offset>
          |<tickets offset>              (one line)

Reader: ``NixlReader`` has one agent per process. A peer's metadata is fetched once (cached, at
most ``max_peers``; the least recently used is removed from the agent); the destination cache's
memory is registered once (at most ``max_registrations`` allocations; least recently used
deregistered). A read is one NIXL ``READ`` of every block (one descriptor per contiguous piece),
polled until done or the timeout, with the tickets read (a second small ``READ``) before and
after: the seqlock of ``region.py``.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvrelay.base.logs import get_logger
from kvrelay.schemas.messages import KVDescriptor
from kvrelay.transport.errors import ChecksumMismatch, LeaseExpired, PeerGone, TransferTimeout, TransportError
from kvrelay.transport.kv.base import (
    BlockTarget,
    KVReader,
    ReadResult,
    check_read,
    check_src_ids,
    page_spans,
    pair_spans,
)
from kvrelay.transport.kv.copy import block_runs
from kvrelay.transport.kv.region import HEADER_BYTES, ExportRegion, block_nbytes

log = get_logger(__name__)

PREFIX = "nixl:1"
MAX_TICKETS = 1 << 16
_AGENT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
POLL_S = (0.00002, 0.001)


class NotAvailable(TransportError):
    """NIXL is not installed (or cannot start) here."""

    code = "not_available"


def _api() -> tuple[Any, Any]:
    for mod in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            api = __import__(mod, fromlist=["nixl_agent"])
            return api.nixl_agent, api.nixl_agent_config
        except ImportError:
            continue
    raise NotAvailable("NIXL is not installed (pip install 'kvrelay[nixl]', i.e. nixl-cu12 or nixl-cu13)")


def nixl_available() -> tuple[bool, str]:
    try:
        _api()
    except NotAvailable as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001 - a broken install (missing libraries) reads as unavailable
        return False, f"NIXL cannot be imported: {exc!r}"
    return True, ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Locator:
    agent: str
    host: str
    port: int
    mem: str  # "DRAM" | "VRAM"
    device: int
    base: int
    num_blocks: int
    data_offset: int
    tickets_offset: int

    def encode(self) -> str:
        return "|".join(map(str, (PREFIX, self.agent, self.host, self.port, self.mem, self.device, self.base,
                                  self.num_blocks, self.data_offset, self.tickets_offset)))

    @classmethod
    def parse(cls, region: str) -> Locator:
        parts = region.split("|")
        if len(parts) != 10 or parts[0] != PREFIX:
            raise PeerGone(f"{region[:40]!r} is not a nixl region")
        try:
            loc = cls(parts[1], parts[2], int(parts[3]), parts[4], *(int(p) for p in parts[5:]))
        except ValueError as exc:
            raise PeerGone(f"malformed nixl region {region[:60]!r}") from exc
        ok = _AGENT.match(loc.agent) and loc.mem in ("DRAM", "VRAM") and 0 < loc.num_blocks <= MAX_TICKETS
        if not ok:
            raise PeerGone(f"malformed nixl region {region[:60]!r}")
        return loc


class NixlExporter:
    """Registers one region with a NIXL agent listening on ``port``; ``locator`` goes in descriptors."""

    def __init__(self, region: Any, *, agent_name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        if not _AGENT.match(agent_name):
            raise ValueError(f"bad NIXL agent name {agent_name!r}")
        nixl_agent, nixl_agent_config = _api()
        port = port or free_port(host)
        if isinstance(region, ExportRegion):
            base, mem, dev = region.base_address, "DRAM", 0
            offset, tickets_at = region.data_offset, HEADER_BYTES
        else:  # a CudaExportRegion
            from kvrelay.transport.kv.cuda_ipc import data_offset

            base, mem, dev = region.tickets.data_ptr(), "VRAM", region.device
            offset, tickets_at = data_offset(region.num_blocks), 0
        size = offset + region.num_blocks * block_nbytes(region.layout)
        conf = nixl_agent_config(enable_listen_thread=True, listen_port=port, backends=["UCX"])
        self._agent = nixl_agent(agent_name, conf)
        self._reg = self._agent.register_memory([(base, size, dev, "")], mem)
        self.locator = Locator(agent_name, host, port, mem, dev, base, region.num_blocks, offset, tickets_at)
        self.name = self.locator.encode()

    def close(self) -> None:
        if self._agent is not None:
            self._agent.deregister_memory(self._reg)
            self._agent = None


class NixlReader(KVReader):
    backend = "nixl"

    def __init__(self, agent_name: str = "", max_peers: int = 16, max_registrations: int = 8,
                 metadata_timeout_s: float = 10.0) -> None:
        self._nixl = _api()
        self._name = agent_name or f"kvrelay-reader-{socket.gethostname()[:24]}-{os.getpid()}"
        self._max_peers, self._max_regs = max_peers, max_registrations
        self._md_timeout = metadata_timeout_s
        self._agent: Any = None
        self._peers: OrderedDict[str, None] = OrderedDict()
        self._regs: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._tickets = torch.zeros(MAX_TICKETS, dtype=torch.int64)
        self._lock = threading.Lock()  # one NIXL request at a time per reader

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
        deadline = t0 + timeout_s
        src = check_read(desc, target, len(dst_block_ids), first_block, self.backend)
        loc = Locator.parse(desc.region)
        check_src_ids(desc, loc.num_blocks)
        kv = target.kv
        mem, dev = ("VRAM", kv.device.index) if kv.is_cuda else ("DRAM", 0)
        bn = block_nbytes(desc.layout)
        with self._lock:
            agent = self._agent_now()
            self._peer(loc, deadline)
            self._register(kv)
            if not self._tickets_match(loc, src, desc.ticket, deadline):
                raise LeaseExpired(f"ticket {desc.ticket} no longer holds its blocks")
            remote = [(loc.base + loc.data_offset + s * bn, k * bn) for s, _, k in block_runs(src, src)]
            local = page_spans(target, dst_block_ids, device_ok=True)
            pairs = pair_spans(local, remote)
            self._xfer(agent, loc, [(a, n, dev) for a, _, n in pairs], mem,
                       [(r, n, loc.device) for _, r, n in pairs], deadline, timeout_s)
            if not self._tickets_match(loc, src, desc.ticket, deadline):
                raise LeaseExpired(f"ticket {desc.ticket} lost its blocks during the read")
        if desc.checksum is not None and not kv.is_cuda:
            self._verify(desc, local, first_block, loc, deadline)
        return ReadResult(blocks=len(src), nbytes=len(src) * bn, seconds=time.monotonic() - t0)

    # -- NIXL plumbing ---------------------------------------------------------------------------
    def _agent_now(self) -> Any:
        if self._agent is None:
            nixl_agent, nixl_agent_config = self._nixl
            conf = nixl_agent_config(enable_listen_thread=True, listen_port=free_port(), backends=["UCX"])
            self._agent = nixl_agent(self._name, conf)
            self._agent.register_memory([(self._tickets.data_ptr(), self._tickets.nbytes, 0, "")], "DRAM")
        return self._agent

    def _peer(self, loc: Locator, deadline: float) -> None:
        if loc.agent in self._peers:
            self._peers.move_to_end(loc.agent)
            return
        agent = self._agent
        agent.fetch_remote_metadata(loc.agent, loc.host, loc.port)
        until = min(deadline, time.monotonic() + self._md_timeout)
        while not agent.check_remote_metadata(loc.agent):
            if time.monotonic() > until:
                raise PeerGone(f"no NIXL metadata from {loc.agent} at {loc.host}:{loc.port}")
            time.sleep(0.002)
        self._peers[loc.agent] = None
        while len(self._peers) > self._max_peers:
            old, _ = self._peers.popitem(last=False)
            agent.remove_remote_agent(old)

    def _register(self, kv: torch.Tensor) -> None:
        storage = kv.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in self._regs:
            self._regs.move_to_end(key)
            return
        mem, dev = ("VRAM", kv.device.index) if kv.is_cuda else ("DRAM", 0)
        self._regs[key] = self._agent.register_memory([(key[0], key[1], dev, "")], mem)
        while len(self._regs) > self._max_regs:
            _, reg = self._regs.popitem(last=False)
            self._agent.deregister_memory(reg)

    def _xfer(self, agent: Any, loc: Locator, local: list, mem: str, remote: list, deadline: float,
              timeout_s: float) -> None:
        lds = agent.get_xfer_descs(local, mem)
        rds = agent.get_xfer_descs(remote, loc.mem)
        try:
            handle = agent.initialize_xfer("READ", lds, rds, loc.agent)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own (nixlBackendError, ...) types
            raise PeerGone(f"NIXL cannot read from {loc.agent}: {exc!r}") from exc
        try:
            state = agent.transfer(handle)
            pause = POLL_S[0]
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferTimeout(f"NIXL read from {loc.agent} passed {timeout_s} s")
                time.sleep(pause)
                pause = min(pause * 2, POLL_S[1])
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise PeerGone(f"NIXL read from {loc.agent} failed ({state})")
        finally:
            try:
                agent.release_xfer_handle(handle)
            except Exception as exc:  # noqa: BLE001 - a handle still in flight is released by NIXL later
                log.warning("nixl_release_failed", error=repr(exc))

    def _tickets_match(self, loc: Locator, blocks: list[int], ticket: int, deadline: float) -> bool:
        n = 8 * loc.num_blocks
        self._xfer(self._agent, loc, [(self._tickets.data_ptr(), n, 0)], "DRAM",
                   [(loc.base + loc.tickets_offset, n, loc.device)], deadline, 0.0)
        return bool((self._tickets[torch.as_tensor(blocks, dtype=torch.int64)] == ticket).all())

    def _verify(self, desc: KVDescriptor, local: list[tuple[int, int]], first: int, loc: Locator,
                deadline: float) -> None:
        crc = 0
        if first:  # the leading blocks were not read: fetch them into a scratch buffer for the check
            bn = block_nbytes(desc.layout)
            lead = torch.empty(first * bn, dtype=torch.uint8)
            with self._lock:
                reg = self._agent.register_memory([(lead.data_ptr(), lead.nbytes, 0, "")], "DRAM")
                try:
                    remote = [(loc.base + loc.data_offset + s * bn, k * bn)
                              for s, _, k in block_runs(desc.block_ids[:first], desc.block_ids[:first])]
                    pairs = pair_spans([(lead.data_ptr(), lead.nbytes)], remote)
                    self._xfer(self._agent, loc, [(a, n, 0) for a, _, n in pairs], "DRAM",
                               [(r, n, loc.device) for _, r, n in pairs], deadline, 0.0)
                finally:
                    self._agent.deregister_memory(reg)
            crc = zlib.crc32(lead.numpy(), crc)
        for a, n in local:
            crc = zlib.crc32((ctypes.c_char * n).from_address(a), crc)
        if crc != desc.checksum:
            raise ChecksumMismatch(f"crc32 {crc:#010x} != exported {desc.checksum:#010x}")

    def close(self) -> None:
        with self._lock:
            if self._agent is None:
                return
            for reg in self._regs.values():
                self._agent.deregister_memory(reg)
            self._regs.clear()
            for peer in self._peers:
                self._agent.remove_remote_agent(peer)
            self._peers.clear()
            self._agent = None
