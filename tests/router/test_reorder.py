"""ReorderBuffer: token chunks back in seq order, bounded, duplicates dropped."""

from __future__ import annotations

from kvrelay.router.reorder import ReorderBuffer
from kvrelay.schemas.messages import TokenChunk


def _chunk(seq: int, final: bool = False) -> TokenChunk:
    return TokenChunk(request_id="r", seq=seq, text=str(seq), finish_reason="stop" if final else None)


def _drain(buf: ReorderBuffer) -> list[int]:
    out = []
    while (c := buf.pop()) is not None:
        out.append(c.seq)
    return out


def test_reorder_releases_in_order_chunks_at_once() -> None:
    buf = ReorderBuffer(8)
    assert [buf.push(_chunk(i)) for i in range(3)] == ["ok"] * 3
    assert _drain(buf) == [0, 1, 2]
    assert buf.next_seq == 3


def test_reorder_holds_out_of_order_chunks_until_the_gap_fills() -> None:
    buf = ReorderBuffer(8)
    buf.push(_chunk(2))
    buf.push(_chunk(1))
    assert _drain(buf) == []
    buf.push(_chunk(0))
    assert _drain(buf) == [0, 1, 2]


def test_reorder_drops_duplicates_released_or_waiting() -> None:
    buf = ReorderBuffer(8)
    buf.push(_chunk(0))
    buf.push(_chunk(2))
    assert buf.push(_chunk(0)) == "duplicate"  # already released
    assert buf.push(_chunk(2)) == "duplicate"  # already waiting
    buf.push(_chunk(1))
    assert _drain(buf) == [0, 1, 2]
    assert buf.dropped == 2


def test_reorder_final_chunk_ends_the_stream_and_later_ones_are_late() -> None:
    buf = ReorderBuffer(8)
    buf.push(_chunk(3))  # a stray chunk past the end
    buf.push(_chunk(1, final=True))
    buf.push(_chunk(0))
    assert _drain(buf) == [0, 1]
    assert buf.finished
    assert buf.push(_chunk(2)) == "late"
    assert buf.dropped == 2  # the stray seq 3 and the late seq 2


def test_reorder_refuses_a_gap_wider_than_its_capacity() -> None:
    buf = ReorderBuffer(4)
    assert buf.push(_chunk(4)) == "overflow"
    assert buf.push(_chunk(3)) == "ok"


def test_reorder_refuses_more_held_chunks_than_its_capacity() -> None:
    buf = ReorderBuffer(4)
    for i in range(4):
        assert buf.push(_chunk(i)) == "ok"  # released, not yet popped: still held
    assert buf.held == 4
    assert buf.push(_chunk(4)) == "overflow"
    buf.pop()
    assert buf.push(_chunk(4)) == "ok"
