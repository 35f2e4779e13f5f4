"""The simulated engine's export region: real (small) KV bytes in shared memory, read by ticket.

A prefill engine exports a finished prompt's KV here; a decode engine in any process on the
host reads it through the ``KVDescriptor`` alone (region name, block ids, ticket). One file in
``/dev/shm``:

    offset 0     header (64 bytes): magic, version, num_blocks, page bytes
    offset 64    tickets  int64[num_blocks]   the export owning each block; 0 = free
    then         pages    bytes[num_blocks, PAGE_BYTES]

A block's page is the simulated KV of one block: the chained hash of its tokens (partial last
blocks too) and its token count, so a reader can check it read *this* prompt's KV. Reads are a
seqlock, as in ``transport.kv.region``: the tickets must equal the descriptor's before and after
the copy (``LeaseExpired`` otherwise). No torch: simulated workers stay light.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from xxhash import xxh64_intdigest

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import LayoutMismatch, LeaseExpired, PeerGone, TransportError

MAGIC = b"KVRSIM\x00\x01"
_HEADER = struct.Struct("<8sQQ")  # magic, num_blocks, page bytes
HEADER_BYTES = 64
PAGE_BYTES = 16  # uint64 block hash, uint64 tokens in the block
_PAGE = struct.Struct("<QQ")


def sim_layout(block_size: int) -> KVLayout:
    """The layout simulated engines put in descriptors (both ends must agree)."""
    return KVLayout(num_layers=1, num_kv_heads=1, head_dim=PAGE_BYTES // 2, block_size=block_size,
                    dtype="uint8", page_elems=PAGE_BYTES, layout="sim")


def kv_pages(token_ids: Sequence[int], block_size: int, root: int) -> list[tuple[int, int]]:
    """The simulated KV of a prompt: per block (full or partial), (chained hash, tokens)."""
    out, h = [], root
    for start in range(0, len(token_ids), block_size):
        chunk = token_ids[start:start + block_size]
        h = xxh64_intdigest(struct.pack(f"<{len(chunk)}I", *chunk), h)
        out.append((h, len(chunk)))
    return out


def default_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path("/tmp")


class SimRegion:
    """One mapped region (owner: created; reader: attached). ``close`` unmaps (owner unlinks)."""

    def __init__(self, path: Path, mm: mmap.mmap, num_blocks: int, owner: bool) -> None:
        self.path, self.name, self.num_blocks, self.owner = path, path.name, num_blocks, owner
        self._mm: mmap.mmap | None = mm
        self._tickets = memoryview(mm)[HEADER_BYTES:HEADER_BYTES + 8 * num_blocks].cast("q")
        self._pages_at = HEADER_BYTES + 8 * num_blocks

    @classmethod
    def create(cls, num_blocks: int, directory: Path | None = None) -> SimRegion:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        path = (directory or default_dir()) / f"kvrelay-sim-{os.getpid()}-{secrets.token_hex(4)}"
        size = HEADER_BYTES + num_blocks * (8 + PAGE_BYTES)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise TransportError(f"cannot create sim export region {path}: {exc}") from exc
        mm[:_HEADER.size] = _HEADER.pack(MAGIC, num_blocks, PAGE_BYTES)
        return cls(path, mm, num_blocks, owner=True)

    @classmethod
    def attach(cls, name: str, directory: Path | None = None) -> SimRegion:
        if not name.startswith("kvrelay-sim-") or "/" in name:
            raise PeerGone(f"{name!r} is not a simulated export region")
        path = (directory or default_dir()) / name
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            raise PeerGone(f"sim export region {name!r} is gone: {exc}") from exc
        magic, num_blocks, page = _HEADER.unpack_from(mm, 0) if size >= HEADER_BYTES else (b"", 0, 0)
        if magic != MAGIC or page != PAGE_BYTES or size != HEADER_BYTES + num_blocks * (8 + PAGE_BYTES):
            mm.close()
            raise PeerGone(f"{name!r} is not a simulated export region of this version")
        return cls(path, mm, num_blocks, owner=False)

    # --- owner ----------------------------------------------------------------------------------
    def write(self, blocks: Sequence[int], pages: Sequence[tuple[int, int]], ticket: int) -> None:
        """Seqlock write: tickets to 0, pages, then tickets to ``ticket``."""
        mm = self._live()
        self.set_tickets(blocks, 0)
        for b, page in zip(blocks, pages):
            _PAGE.pack_into(mm, self._pages_at + b * PAGE_BYTES, *page)
        self.set_tickets(blocks, ticket)

    def set_tickets(self, blocks: Sequence[int], ticket: int) -> None:
        self._live()
        for b in blocks:
            self._tickets[b] = ticket

    # --- reader ---------------------------------------------------------------------------------
    def read(self, desc: KVDescriptor) -> list[tuple[int, int]]:
        """The pages ``desc`` names, checked against its ticket before and after the copy."""
        mm = self._live()
        if any(not 0 <= b < self.num_blocks for b in desc.block_ids):
            raise LayoutMismatch(f"descriptor names blocks outside region {self.name!r}")
        if not self._owned(desc.block_ids, desc.ticket):
            raise LeaseExpired(f"ticket {desc.ticket} no longer holds its blocks")
        pages = [_PAGE.unpack_from(mm, self._pages_at + b * PAGE_BYTES) for b in desc.block_ids]
        if not self._owned(desc.block_ids, desc.ticket):
            raise LeaseExpired(f"ticket {desc.ticket} lost its blocks during the read")
        return pages

    def _owned(self, blocks: Sequence[int], ticket: int) -> bool:
        t = self._tickets
        return all(t[b] == ticket for b in blocks)

    def _live(self) -> mmap.mmap:
        if self._mm is None:
            raise PeerGone(f"sim export region {self.name!r} is closed")
        return self._mm

    def close(self) -> None:
        """Unmap; the owner zeroes every ticket first (late readers see their lease gone) and
        unlinks the file. Idempotent."""
        if self._mm is None:
            return
        if self.owner:
            for b in range(self.num_blocks):
                self._tickets[b] = 0
        self._tickets.release()
        mm, self._mm = self._mm, None
        mm.close()
        if self.owner:
            self.path.unlink(missing_ok=True)


class SimRegionReader:
    """Attached regions by name, at most ``max_regions`` (least recently used closed first)."""

    def __init__(self, max_regions: int = 64, directory: Path | None = None) -> None:
        if max_regions < 1:
            raise ValueError("max_regions must be >= 1")
        self._max, self._dir = max_regions, directory
        self._regions: OrderedDict[str, SimRegion] = OrderedDict()

    def read(self, desc: KVDescriptor) -> list[tuple[int, int]]:
        region = self._regions.get(desc.region)
        if region is not None and not region.path.exists():  # the exporter is gone
            del self._regions[desc.region]
            region.close()
            raise PeerGone(f"sim export region {desc.region!r} is gone")
        if region is None:
            region = SimRegion.attach(desc.region, self._dir)
            self._regions[desc.region] = region
            while len(self._regions) > self._max:
                self._regions.popitem(last=False)[1].close()
        self._regions.move_to_end(desc.region)
        return region.read(desc)

    def close(self) -> None:
        while self._regions:
            self._regions.popitem()[1].close()
