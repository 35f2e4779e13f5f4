"""KV event messages: round trips, packing, validation on receipt."""

from __future__ import annotations

import msgpack
import pytest

from kvrelay.schemas.codec import unpack, pack
from kvrelay.schemas.errors import OversizeError, SchemaError, ValidationError
from kvrelay.schemas.kv_events import (
    MAX_EVENT_BLOCKS,
    KvEvent,
    KvEventBatch,
    KvSnapshot,
    KvSnapshotRequest,
    pack_hashes,
    snapshot_chunks,
    unpack_hashes,
)

BIG = (1 << 64) - 1


def _batch(**kw) -> KvEventBatch:
    base = dict(worker_id="w1", epoch=7, event_id=1, spec="xxh64-chain-v1/bs=32/seed=00",
                events=[KvEvent.stored([1, 2, BIG], parent=None, num_tokens=96),
                        KvEvent.removed([5]), KvEvent.cleared()])
    base.update(kw)
    return KvEventBatch(**base)


def test_kv_event_batch_round_trips() -> None:
    batch = _batch()
    got = unpack(pack(batch), KvEventBatch)
    assert got == batch
    assert [e.kind for e in got.events] == ["stored", "removed", "cleared"]
    assert got.events[0].block_hashes == [1, 2, BIG]
    assert got.num_blocks == 4


def test_pack_hashes_is_little_endian_uint64() -> None:
    assert pack_hashes([1, 256]) == (1).to_bytes(8, "little") + (256).to_bytes(8, "little")
    assert unpack_hashes(pack_hashes([0, BIG, 12345])) == [0, BIG, 12345]


@pytest.mark.parametrize("bad", [[-1], [1 << 64], ["x"]])
def test_pack_hashes_rejects_non_uint64(bad: list) -> None:
    with pytest.raises(ValidationError):
        pack_hashes(bad)


def _tamper(batch: KvEventBatch, **event_fields) -> bytes:
    env = msgpack.unpackb(pack(batch), raw=False)
    env["b"]["events"][0].update(event_fields)
    return msgpack.packb(env, use_bin_type=True)


@pytest.mark.parametrize("fields", [
    {"hashes": b"\x00" * 7},  # not a multiple of 8
    {"kind": "moved"},
    {"kind": "cleared"},  # cleared with hashes
    {"hashes": b""},  # stored with nothing
    {"parent": -1},
    {"parent": True},  # a bool is not an int on the wire
    {"num_tokens": True},
    {"extra": 1},  # unknown field
    {"hashes": b"\x00" * 8 * (MAX_EVENT_BLOCKS + 1)},
])
def test_kv_event_batch_rejects_bad_events_on_receipt(fields: dict) -> None:
    with pytest.raises(SchemaError):
        unpack(_tamper(_batch(events=[KvEvent.stored([1])]), **fields), KvEventBatch)


def test_kv_event_removed_with_parent_is_invalid() -> None:
    with pytest.raises(ValidationError, match="parent"):
        unpack(_tamper(_batch(events=[KvEvent.removed([1])]), parent=3), KvEventBatch)


def test_kv_event_parent_is_a_uint64_when_built_from_a_mapping() -> None:
    with pytest.raises(ValidationError, match="parent"):
        KvEvent.from_mapping({"kind": "stored", "hashes": b"\x00" * 8, "parent": 1 << 64})
    assert KvEvent.from_mapping({"kind": "stored", "hashes": b"\x00" * 8, "parent": (1 << 64) - 1}).parent


@pytest.mark.parametrize("field,value", [("event_id", 0), ("epoch", -1), ("worker_id", "x" * 200)])
def test_kv_event_batch_rejects_bad_header(field: str, value: object) -> None:
    env = msgpack.unpackb(pack(_batch()), raw=False)
    env["b"][field] = value
    with pytest.raises(ValidationError):
        unpack(msgpack.packb(env, use_bin_type=True), KvEventBatch)


def test_kv_event_batch_over_max_bytes_is_refused() -> None:
    events = [KvEvent.stored(list(range(MAX_EVENT_BLOCKS)))] * 20
    with pytest.raises(OversizeError):
        pack(_batch(events=events))


def test_snapshot_chunks_split_and_reassemble() -> None:
    hashes = list(range(10)) + [3]  # a hash held twice appears twice
    chunks = snapshot_chunks("w1", 2, 40, "spec", hashes, chunk_size=4)
    assert [c.chunk for c in chunks] == [0, 1, 2] and {c.chunks for c in chunks} == {3}
    got = [unpack(pack(c), KvSnapshot) for c in chunks]
    assert [h for c in got for h in c.block_hashes] == hashes
    assert all(c.event_id == 40 and c.epoch == 2 for c in got)


def test_snapshot_chunks_of_nothing_is_one_empty_chunk() -> None:
    (only,) = snapshot_chunks("w1", 1, 0, "spec", [])
    assert only.chunks == 1 and only.block_hashes == []


def test_snapshot_rejects_chunk_past_count() -> None:
    env = msgpack.unpackb(pack(snapshot_chunks("w1", 1, 0, "s", [1])[0]), raw=False)
    env["b"]["chunk"] = 1
    with pytest.raises(ValidationError, match="chunk"):
        unpack(msgpack.packb(env, use_bin_type=True), KvSnapshot)


def test_snapshot_request_round_trips() -> None:
    req = KvSnapshotRequest(router_id="r1", reply_to="_INBOX.abc", reason="gap")
    assert unpack(pack(req), KvSnapshotRequest) == req
