"""Backend negotiation (pure) and the fetcher's fall-through rules, with in-memory readers."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import ChecksumMismatch, KVTransferError, LeaseExpired, PeerGone
from kvrelay.transport.kv.base import BlockTarget, KVReader, ReadResult, offered, pair_spans
from kvrelay.transport.kv.fetch import KVFetcher, available, make_reader, plan
from kvrelay.transport.kv.metrics import decode_skipped, encode_skipped

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, block_size=2, dtype="float32", page_elems=8)


def desc(backend="shm", fallbacks=(), host="here", endpoint="") -> KVDescriptor:
    return KVDescriptor(
        backend=backend,
        worker_id="p",
        host=host,
        region="r",
        block_ids=[0],
        num_tokens=2,
        ticket=1,
        lease_expires_ms=int(time.time() * 1000) + 60_000,
        layout=LAYOUT,
        endpoint=endpoint,
        fallbacks=list(fallbacks),
    )


@pytest.mark.parametrize(
    "d, reader_backends, want",
    [
        (desc("shm", ["tcp"], endpoint="h:1"), ["shm", "tcp"], ["shm", "tcp"]),
        (desc("shm", ["tcp"], endpoint="h:1"), ["tcp", "shm"], ["tcp", "shm"]),  # the reader's order rules
        (desc("shm", ["tcp"], host="there", endpoint="h:1"), ["shm", "cma", "tcp"], ["tcp"]),  # other host
        (desc("shm", ["tcp"]), ["shm", "tcp"], ["shm"]),  # tcp offered without an endpoint
        (desc("shm"), ["cma", "shm"], ["cma", "shm"]),  # cma reads shm exports
        (desc("tcp", endpoint="h:1"), ["shm", "cma"], []),  # nothing in common
        (desc("cuda-ipc", ["tcp"], host="there", endpoint="h:1"), ["cuda-ipc", "tcp"], ["tcp"]),
        (desc("nixl", host="there"), ["nixl", "tcp"], ["nixl"]),  # nixl crosses hosts
        (desc("shm", ["shm", "tcp"], endpoint="h:1"), ["tcp", "tcp", "shm"], ["tcp", "shm"]),  # no repeats
    ],
)
def test_fetch_plan_keeps_the_reader_order_and_drops_what_cannot_work(d, reader_backends, want) -> None:
    assert plan(d, reader_backends, "here") == want


def test_fetch_offered_lists_primary_then_fallbacks() -> None:
    assert offered(desc("shm", ["tcp", "shm"])) == ("shm", "tcp")


class Scripted(KVReader):
    """Raises the given error, or reads nothing and succeeds (pure logic test double)."""

    backend = "x"

    def __init__(self, error: KVTransferError | None = None) -> None:
        self.error, self.calls = error, 0

    def read(self, desc, target, dst_block_ids: Sequence[int], *, first_block=0, timeout_s) -> ReadResult:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return ReadResult(blocks=len(dst_block_ids), nbytes=0, seconds=0.0)


def target() -> BlockTarget:
    return BlockTarget(kv=torch.zeros(2, 1, 8), layout=LAYOUT)


def test_fetch_falls_through_only_on_peer_gone() -> None:
    d = desc("shm", ["tcp"], endpoint="h:1")
    shm, tcp = Scripted(PeerGone("no mapping")), Scripted()
    got = KVFetcher({"shm": shm, "tcp": tcp}, ["shm", "tcp"], host="here").read(d, target(), [0], timeout_s=5)
    assert (got.backend, got.skipped) == ("tcp", (("shm", "peer_gone"),))
    for err in (LeaseExpired("gone"), ChecksumMismatch("bad")):
        shm, tcp = Scripted(err), Scripted()
        with pytest.raises(type(err)):
            KVFetcher({"shm": shm, "tcp": tcp}, ["shm", "tcp"], host="here").read(
                d, target(), [0], timeout_s=5
            )
        assert tcp.calls == 0  # the same region by another path would not help


def test_fetch_without_a_common_backend_is_peer_gone() -> None:
    with pytest.raises(PeerGone, match="no common backend"):
        KVFetcher({"shm": Scripted()}, ["shm"], host="here").read(
            desc(host="there"), target(), [0], timeout_s=5
        )


def test_fetch_available_and_make_reader() -> None:
    assert available("shm") == (True, "") and available("tcp") == (True, "")
    assert available("bogus")[0] is False
    ok, why = available("cuda-ipc")
    assert ok or why  # a reason whenever it is not usable
    with pytest.raises(ValueError):
        make_reader("bogus")
    make_reader("tcp").close()


def test_fetch_skipped_roundtrip_and_pair_spans() -> None:
    items = [("cma", "cma_denied"), ("shm", "peer_gone")]
    assert decode_skipped(encode_skipped(items)) == items
    assert pair_spans([(100, 6), (200, 4)], [(1000, 3), (2000, 7)]) == [
        (100, 1000, 3),
        (103, 2000, 3),
        (200, 2003, 4),
    ]
    with pytest.raises(KVTransferError):
        pair_spans([(0, 5)], [(0, 4)])
