"""A shared-memory export region: where a prefill worker keeps finished prefills' KV for decode workers.

One file in ``/dev/shm`` (POSIX shared memory), mapped by every process that touches it:

    offset 0            header (4096 bytes): magic, version, num_blocks, layout fingerprint, owner pid
                        (+ at ``OWNER_MAP_AT``: the owner's pid and mapping address, for ``cma`` readers)
    offset 4096         tickets   int64[num_blocks]        the export that owns each block; 0 = free
    offset data_offset  data      dtype[num_blocks, num_layers, page_elems]   (4096-aligned)

One region block holds one vLLM block for *all* layers, contiguous, so a request's blocks are
read in large runs. The owner (the prefill worker's main process) creates the region before
the engine starts and unlinks it on ``close``; the connector inside vLLM's EngineCore process
and decode workers on the same host ``attach`` by name. Nothing here allocates blocks: that is
``leases.LeaseTable`` (owner only).

Memory: the owner pre-faults the whole region at ``create`` (``prefault``, default on: the pages
are allocated and mapped then, ``export_mb`` of RAM committed up front), because a copy into
never-touched shared pages runs at ~1-2 GB/s (a page fault per 4 KiB) against ~8-11 GB/s into
faulted ones (the export copy of a 4096-token SmolLM2 prefill: ~60 ms into fresh pages, ~9 ms
into faulted ones). Readers map with ``MAP_POPULATE`` for the same reason.

Tickets make reads safe without locks (a seqlock): a writer sets a block's ticket to 0, writes
the data, then sets the ticket; a reader checks the tickets equal its descriptor's ticket before
AND after copying. A block freed or reused meanwhile fails the second check (``LeaseExpired``).
Aligned 8-byte stores are atomic and stores are not reordered with other stores on x86-64;
a weakly ordered CPU would need fences around the ticket writes.

The owner's file is unlinked by ``close``, or at interpreter exit at the latest. A region left
behind by a killed owner (SIGKILL, OOM) is swept by the next ``create`` in the same directory:
every owner holds a shared ``flock`` on its file for the region's life, the kernel drops it when
the owner dies however it dies, and ``sweep_stale`` unlinks the ``kvrelay-*`` files on which an
exclusive lock can be taken (no live owner) and that are older than ``min_age_s`` (a file being
created is never taken for a dead one). Locks, unlike pids, hold across containers that share
``/dev/shm``. Readers that still map a swept region keep their mapping (unlink frees the memory
when the last mapping goes).
"""

from __future__ import annotations

import hashlib
import json
import fcntl
import mmap
import os
import re
import secrets
import struct
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from kvrelay.base.logs import get_logger
from kvrelay.schemas.messages import KVLayout
from kvrelay.transport.errors import LayoutMismatch, PeerGone, TransportError

MAGIC = b"KVRELAY\x00"
VERSION = 1
HEADER_BYTES = 4096
ALIGN = 4096
# magic, version, header_bytes, num_blocks, fingerprint, data_offset, data_bytes, owner_pid, created_ms
_HEADER = struct.Struct("<8sIIQQQQQQ")
# at OWNER_MAP_AT: magic, owner pid, address of the owner's mapping (offset 0) in the owner's process
_OWNER_MAP = struct.Struct("<8sQQ")
OWNER_MAP_AT = 512
OWNER_MAGIC = b"KVRCMA01"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_OURS = re.compile(r"kvrelay-[0-9]+-[0-9a-f]{8}")  # what new_region_name makes: the only files swept
log = get_logger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "uint8": torch.uint8,
}


def default_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def new_region_name() -> str:
    return f"kvrelay-{os.getpid()}-{secrets.token_hex(4)}"


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise LayoutMismatch(f"unsupported KV dtype {name!r}; known: {sorted(DTYPES)}") from None


def layout_fingerprint(layout: KVLayout) -> int:
    """A 63-bit hash of every layout field: equal fingerprints mean byte-compatible blocks."""
    canon = json.dumps(layout.to_mapping(), sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(canon, digest_size=8).digest(), "little") >> 1


def block_nbytes(layout: KVLayout) -> int:
    """Bytes of one region block (all layers)."""
    return layout.num_layers * layout.page_elems * torch_dtype(layout.dtype).itemsize


def blocks_for_bytes(layout: KVLayout, nbytes: int) -> int:
    n = nbytes // block_nbytes(layout)
    if n < 1:
        raise ValueError(f"{nbytes} bytes hold no block of {block_nbytes(layout)} bytes")
    return n


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _map_flags(populate: bool) -> int:
    return mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)


def parse_header(header: bytes | memoryview, name: str, layout: KVLayout) -> tuple[int, int, int]:
    """(num_blocks, data_offset, data_bytes) of a region's first page, checked like ``attach`` does."""
    if len(header) < HEADER_BYTES:
        raise PeerGone(f"export region {name!r} is truncated")
    magic, version, hdr, num_blocks, fp, data_offset, data_bytes, _pid, _ms = _HEADER.unpack_from(header, 0)
    if magic != MAGIC or hdr != HEADER_BYTES:
        raise PeerGone(f"{name!r} is not a kvrelay export region (or is still being created)")
    if version != VERSION:
        raise LayoutMismatch(f"region {name!r} is version {version}, this build reads {VERSION}")
    if fp != layout_fingerprint(layout):
        raise LayoutMismatch(f"region {name!r} holds another KV layout than {layout.to_mapping()}")
    if data_bytes != num_blocks * block_nbytes(layout):
        raise PeerGone(f"region {name!r} has an inconsistent size")
    return num_blocks, data_offset, data_bytes


def _drop(path: Path, lock_fd: int | None) -> None:
    """The owner's last act: unlink the file, then let go of its lock."""
    path.unlink(missing_ok=True)
    if lock_fd is not None:
        try:
            os.close(lock_fd)
        except OSError:
            pass


def sweep_stale(directory: Path | None = None, min_age_s: float = 10.0) -> list[str]:
    """Unlink the regions in ``directory`` that no live process owns (see the module doc);
    returns their names. Never raises: a file it cannot judge is left alone."""
    directory = directory or default_dir()
    swept: list[str] = []
    try:
        entries = [e for e in os.scandir(directory) if _OURS.fullmatch(e.name)]
    except OSError:
        return swept
    now = time.time()
    for entry in entries:
        try:
            if now - entry.stat().st_mtime < min_age_s:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live owner holds it
        else:
            try:
                os.unlink(entry.path)
                swept.append(entry.name)
            except OSError:
                pass
        finally:
            os.close(fd)
    if swept:
        log.warning("kv_regions_swept", directory=str(directory), regions=swept)
    return swept


def check_region_name(name: str) -> None:
    """``PeerGone`` unless ``name`` is a plain region file name (no path parts)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise PeerGone(f"invalid region name {name!r}")


class ExportRegion:
    """A mapped export region. ``tickets``: int64[num_blocks]; ``data``: [num_blocks, layers, page]."""

    def __init__(
        self,
        name: str,
        path: Path,
        mm: mmap.mmap,
        layout: KVLayout,
        num_blocks: int,
        data_offset: int,
        owner: bool,
        lock_fd: int | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.layout = layout
        self.num_blocks = num_blocks
        self.owner = owner
        self._mm: mmap.mmap | None = mm
        self.data_offset = data_offset
        # the owner's file goes at interpreter exit at the latest, even if close() is never called
        self._unlink = weakref.finalize(self, _drop, path, lock_fd) if owner else None
        dtype = torch_dtype(layout.dtype)
        # int64[num_blocks]
        self.tickets = torch.frombuffer(mm, dtype=torch.int64, count=num_blocks, offset=HEADER_BYTES)
        count = num_blocks * layout.num_layers * layout.page_elems
        flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=data_offset)
        # [num_blocks, num_layers, page_elems]
        self.data = flat.view(num_blocks, layout.num_layers, layout.page_elems)

    @property
    def block_nbytes(self) -> int:
        return block_nbytes(self.layout)

    @property
    def base_address(self) -> int:
        """Address of this mapping (offset 0) in this process."""
        return self.tickets.data_ptr() - HEADER_BYTES

    def block_bytes(self, start: int, count: int) -> memoryview:
        """The bytes of blocks ``start .. start+count-1`` (contiguous); release the view when done."""
        if self._mm is None:
            raise PeerGone(f"export region {self.name!r} is closed")
        if start < 0 or count < 0 or start + count > self.num_blocks:
            raise LayoutMismatch(f"blocks {start}..{start + count - 1} outside region {self.name!r}")
        bn = self.block_nbytes
        at = self.data_offset + start * bn
        with memoryview(self._mm) as whole:
            return whole[at : at + count * bn]

    @classmethod
    def create(
        cls,
        name: str,
        layout: KVLayout,
        num_blocks: int,
        directory: Path | None = None,
        *,
        prefault: bool = True,
    ) -> ExportRegion:
        """Create (exclusively) and map a zeroed region; the caller owns it and must ``close`` it.

        ``prefault``: allocate and map every page now (see the module doc); off, pages come on
        first touch (cheaper to create, slower first exports)."""
        check_region_name(name)
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        path = (directory or default_dir()) / name
        data_offset = _align(HEADER_BYTES + 8 * num_blocks)
        data_bytes = num_blocks * block_nbytes(layout)
        size = data_offset + data_bytes
        sweep_stale(path.parent)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)  # held for the region's life: "a live owner"
        except OSError as exc:
            raise TransportError(f"cannot create export region {path}: {exc}") from exc
        try:
            os.ftruncate(fd, size)
            if prefault:
                os.posix_fallocate(fd, 0, size)  # ENOSPC now rather than SIGBUS on a later write
            mm = mmap.mmap(fd, size, _map_flags(prefault), mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise TransportError(f"cannot size export region {path} to {size} bytes: {exc}") from exc
        # the magic goes last: a half-made region is never attached
        header = _HEADER.pack(
            b"\x00" * 8,
            VERSION,
            HEADER_BYTES,
            num_blocks,
            layout_fingerprint(layout),
            data_offset,
            data_bytes,
            os.getpid(),
            int(time.time() * 1000),
        )
        mm[: _HEADER.size] = header
        region = cls(name, path, mm, layout, num_blocks, data_offset, owner=True, lock_fd=fd)
        mm[OWNER_MAP_AT : OWNER_MAP_AT + _OWNER_MAP.size] = _OWNER_MAP.pack(
            OWNER_MAGIC, os.getpid(), region.base_address
        )
        mm[:8] = MAGIC
        return region

    @classmethod
    def attach(
        cls, name: str, layout: KVLayout, directory: Path | None = None, *, populate: bool = True
    ) -> ExportRegion:
        """Map an existing region. Missing or damaged -> ``PeerGone``; other layout -> ``LayoutMismatch``.

        ``populate``: map every page now (``MAP_POPULATE``) so the first read runs at copy speed."""
        check_region_name(name)
        path = (directory or default_dir()) / name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise PeerGone(f"export region {name!r} is gone: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise PeerGone(f"export region {name!r} is truncated ({size} bytes)")
            mm = mmap.mmap(fd, size, _map_flags(populate), mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise PeerGone(f"cannot map export region {name!r}: {exc}") from exc
        finally:
            os.close(fd)
        try:
            num_blocks, data_offset = cls._check_header(mm, name, layout, size)
        except Exception:
            mm.close()
            raise
        return cls(name, path, mm, layout, num_blocks, data_offset, owner=False)

    @staticmethod
    def read_owner_map(header: bytes | memoryview) -> tuple[int, int] | None:
        """(owner pid, owner's mapping address) from a region's first page, or None (not recorded)."""
        magic, pid, base = _OWNER_MAP.unpack_from(header, OWNER_MAP_AT)
        return (pid, base) if magic == OWNER_MAGIC and pid > 0 and base > 0 else None

    @staticmethod
    def _check_header(mm: mmap.mmap, name: str, layout: KVLayout, size: int) -> tuple[int, int]:
        num_blocks, data_offset, data_bytes = parse_header(mm[:HEADER_BYTES], name, layout)
        if data_offset + data_bytes > size:
            raise PeerGone(f"region {name!r} has an inconsistent size")
        return num_blocks, data_offset

    def tickets_match(self, blocks: Sequence[int], ticket: int) -> bool:
        idx = torch.as_tensor(blocks, dtype=torch.int64)
        return bool((self.tickets.index_select(0, idx) == ticket).all())

    def set_tickets(self, blocks: Sequence[int], ticket: int) -> None:
        self.tickets[torch.as_tensor(blocks, dtype=torch.int64)] = ticket

    def clear_tickets(self, blocks: Sequence[int]) -> None:
        self.set_tickets(blocks, 0)

    def close(self) -> None:
        """Unmap; the owner also unlinks the file. Idempotent."""
        if self._mm is None:
            return
        if self.owner:
            self.tickets.zero_()  # readers still mapping it see every lease gone
        mm, self._mm = self._mm, None
        del self.tickets, self.data
        try:
            mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when that view does
        if self._unlink is not None:
            self._unlink()

    @property
    def closed(self) -> bool:
        return self._mm is None

    def __enter__(self) -> ExportRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
