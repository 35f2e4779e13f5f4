"""Notices over the engine's UNIX datagram socket (real sockets, no vLLM)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kvrelay.workers.vllm_engine.notify import MAX_NOTICES, NotifyReceiver, NotifySender
from kvrelay.workers.vllm_engine.params import Notice, failed


@pytest.fixture
async def receiver():
    seen: list[tuple[Notice, bool]] = []
    rx = NotifyReceiver(lambda n, m: seen.append((n, m)), max_pending=4)
    rx.start(asyncio.get_running_loop())
    rx.seen = seen
    yield rx
    rx.close()


async def test_notify_resolves_the_awaited_notice(receiver: NotifyReceiver) -> None:
    fut = receiver.expect(("export", 7))
    tx = NotifySender(receiver.path)
    tx.send(
        [
            Notice(kind="export", ticket=7, blocks=3, nbytes=300, ms=0.5, checksum=12),
            failed("import", "lease_expired", "gone", ticket=7, nonce=9),
        ]
    )
    got = await asyncio.wait_for(fut, 5)
    assert (got.ticket, got.blocks, got.checksum, got.ok) == (7, 3, 12, True)
    # both came in one datagram, handled in one callback: the unmatched one is seen already
    assert [(n.kind, m) for n, m in receiver.seen] == [("export", True), ("import", False)]
    assert receiver.seen[1][0].code == "lease_expired" and receiver.pending == 0
    tx.close()


async def test_notify_splits_large_batches(receiver: NotifyReceiver) -> None:
    n = 2 * MAX_NOTICES + 5
    last = receiver.expect(("import", n))
    NotifySender(receiver.path).send([Notice(kind="import", nonce=i + 1) for i in range(n)])
    assert (await asyncio.wait_for(last, 5)).nonce == n
    assert len(receiver.seen) == n


async def test_notify_bad_datagrams_are_counted_and_skipped(receiver: NotifyReceiver) -> None:
    fut = receiver.expect(("export", 1))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"\xc1 not msgpack", receiver.path)
        s.sendto(b"\x80", receiver.path)  # an empty map: not a batch
    NotifySender(receiver.path).send([Notice(kind="export", ticket=1)])
    await asyncio.wait_for(fut, 5)
    assert receiver.bad == 2


async def test_notify_expect_is_bounded_and_unique(receiver: NotifyReceiver) -> None:
    receiver.expect(("export", 1))
    with pytest.raises(ValueError):
        receiver.expect(("export", 1))
    for t in range(2, 5):
        receiver.expect(("export", t))
    with pytest.raises(RuntimeError):
        receiver.expect(("export", 99))
    receiver.forget(("export", 1))
    assert receiver.pending == 3


def test_notify_sender_to_missing_receiver_drops_and_counts(tmp_path) -> None:
    tx = NotifySender(str(tmp_path / "none.sock"))
    tx.send([Notice(kind="export", ticket=1)])
    assert tx.dropped == 1
    tx.close()
