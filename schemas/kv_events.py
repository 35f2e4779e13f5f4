"""KV cache events: what a worker holds, told to routers (``kvrelay.<ns>.kv.events.<worker>``).

A worker numbers its ``KvEventBatch`` messages 1, 2, 3, ... within one ``epoch`` (a new epoch
each time its cache starts empty: process start, engine restart). A router that sees a gap in
the numbers, or joins late, asks the worker for a ``KvSnapshot`` (everything it holds, as of
one event id) and replays the batches after it.

Block hashes travel packed: little-endian uint64, 8 bytes each (``schemas.hashing`` defines
them). Packing keeps a 64-block event at ~530 bytes and decoding in C, which matters because
routers apply every event of every worker.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from sys import byteorder
from typing import Literal

from kvrelay.schemas.codec import Message, message
from kvrelay.schemas.errors import ValidationError
from kvrelay.schemas.struct import Struct, limit

MAX_EVENT_BLOCKS = 8192  # hashes in one event
MAX_BATCH_EVENTS = 1024  # events in one batch
MAX_SNAPSHOT_CHUNK = 65536  # hashes in one snapshot chunk (512 KiB packed)
_BIG_ENDIAN = byteorder == "big"
_MAX_ID = (1 << 63) - 1


def pack_hashes(hashes: Iterable[int]) -> bytes:
    """Unsigned 64-bit ints -> little-endian bytes. Raises ValidationError for bad values."""
    try:
        arr = array("Q", hashes)
    except (TypeError, OverflowError) as exc:
        raise ValidationError("hashes", f"block hashes must be ints in [0, 2**64): {exc}") from exc
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def unpack_hashes(data: bytes) -> list[int]:
    """Little-endian packed uint64 bytes -> list of ints."""
    arr = array("Q")
    arr.frombytes(data)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tolist()


def _check_packed(data: bytes, path: str, max_blocks: int) -> None:
    if len(data) % 8:
        raise ValidationError(path, f"packed hashes must be a multiple of 8 bytes, got {len(data)}")
    if len(data) > 8 * max_blocks:
        raise ValidationError(path, f"{len(data) // 8} hashes is over the limit of {max_blocks}")


@message
class KvEvent(Struct):
    """One change to a worker's cache.

    ``stored``: ``hashes`` became resident, in prefix order; ``parent`` is the hash of the
    block before the first of them (None: they start at the root). ``removed``: ``hashes``
    were evicted. ``cleared``: everything was dropped. The same hash can be stored twice and
    removed twice (references are counted). ``num_tokens`` and ``medium`` are informative.
    """

    kind: Literal["stored", "removed", "cleared"]
    hashes: bytes = b""
    parent: int | None = limit(None, min=0)  # < 2**64: checked in validate (msgspec bounds are int64)
    num_tokens: int = limit(0, min=0, max=1 << 30)
    medium: str = limit("gpu", max_len=16)

    def validate(self) -> None:
        _check_packed(self.hashes, "KvEvent.hashes", MAX_EVENT_BLOCKS)
        if self.parent is not None and self.parent >= 1 << 64:
            raise ValidationError("KvEvent.parent", f"{self.parent} is above the maximum {(1 << 64) - 1}")
        if self.kind == "cleared":
            if self.hashes or self.parent is not None:
                raise ValidationError("KvEvent", "a cleared event carries no hashes and no parent")
        elif not self.hashes:
            raise ValidationError("KvEvent.hashes", f"a {self.kind} event needs at least one hash")
        elif self.kind == "removed" and self.parent is not None:
            raise ValidationError("KvEvent.parent", "a removed event has no parent")

    @property
    def block_hashes(self) -> list[int]:
        return unpack_hashes(self.hashes)

    @classmethod
    def stored(
        cls, hashes: Sequence[int], parent: int | None = None, num_tokens: int = 0, medium: str = "gpu"
    ) -> KvEvent:
        return cls(kind="stored", hashes=pack_hashes(hashes), parent=parent, num_tokens=num_tokens,
                   medium=medium)

    @classmethod
    def removed(cls, hashes: Sequence[int], medium: str = "gpu") -> KvEvent:
        return cls(kind="removed", hashes=pack_hashes(hashes), medium=medium)

    @classmethod
    def cleared(cls) -> KvEvent:
        return cls(kind="cleared")


@message
class KvEventBatch(Message):
    """Worker -> ``kvrelay.<ns>.kv.events.<worker>`` (JetStream stream, bounded retention).

    ``event_id`` is this batch's number: 1 for the first batch of an ``epoch``, then +1 per
    batch. ``spec`` is the worker's ``HashSpec.fingerprint``; a router rejects batches whose
    spec differs from its own (and says so in logs and metrics).
    """

    TYPE = "KvEventBatch"
    MAX_BYTES = 1 << 20

    worker_id: str = limit(max_len=128)
    epoch: int = limit(min=0, max=_MAX_ID)
    event_id: int = limit(min=1, max=_MAX_ID)
    spec: str = limit(max_len=128)
    events: list[KvEvent] = limit(max_len=MAX_BATCH_EVENTS)
    sent_ms: int = limit(0, min=0)

    @property
    def num_blocks(self) -> int:
        return sum(len(e.hashes) >> 3 for e in self.events)


@message
class KvSnapshotRequest(Message):
    """Router -> ``kvrelay.<ns>.kv.snapshot.<worker>``: send me everything you hold.

    The worker answers with ``KvSnapshot`` chunks published to ``reply_to`` (a subject the
    router subscribed to first), all with the same ``event_id``.
    """

    TYPE = "KvSnapshotRequest"

    router_id: str = limit(max_len=128)
    reply_to: str = limit(max_len=256)
    reason: str = limit("", max_len=64)


@message
class KvSnapshot(Message):
    """Worker -> router: the hashes the worker holds as of ``event_id`` (after applying it).

    Large caches are split into chunks ``0 .. chunks-1``; the router applies the snapshot once
    it has them all. A hash held twice appears twice (references are counted).
    """

    TYPE = "KvSnapshot"
    MAX_BYTES = 1 << 20

    worker_id: str = limit(max_len=128)
    epoch: int = limit(min=0, max=_MAX_ID)
    event_id: int = limit(min=0, max=_MAX_ID)  # 0: nothing published yet this epoch
    spec: str = limit(max_len=128)
    chunk: int = limit(0, min=0)
    chunks: int = limit(1, min=1, max=1 << 16)
    hashes: bytes = b""

    def validate(self) -> None:
        _check_packed(self.hashes, "KvSnapshot.hashes", MAX_SNAPSHOT_CHUNK)
        if self.chunk >= self.chunks:
            raise ValidationError("KvSnapshot.chunk", f"chunk {self.chunk} of {self.chunks}")

    @property
    def block_hashes(self) -> list[int]:
        return unpack_hashes(self.hashes)


def snapshot_chunks(
    worker_id: str, epoch: int, event_id: int, spec: str, hashes: Sequence[int],
    chunk_size: int = MAX_SNAPSHOT_CHUNK,
) -> list[KvSnapshot]:
    """Split a worker's held hashes into ``KvSnapshot`` chunks (at least one, maybe empty)."""
    if not 1 <= chunk_size <= MAX_SNAPSHOT_CHUNK:
        raise ValidationError("chunk_size", f"must be in [1, {MAX_SNAPSHOT_CHUNK}]")
    n = max(1, -(-len(hashes) // chunk_size))
    return [
        KvSnapshot(worker_id=worker_id, epoch=epoch, event_id=event_id, spec=spec, chunk=i, chunks=n,
                   hashes=pack_hashes(hashes[i * chunk_size:(i + 1) * chunk_size]))
        for i in range(n)
    ]
