"""LeaseTable: the export region's block allocator and lease table (pure, no I/O)."""

from __future__ import annotations

import pytest

from kvrelay.transport.errors import Backpressure, RegionFull
from kvrelay.transport.kv.leases import NEVER, LeaseTable


def make(n: int = 8) -> tuple[LeaseTable, list[list[int]]]:
    freed: list[list[int]] = []
    return LeaseTable(n, on_free=freed.append), freed


def test_leases_allocate_takes_contiguous_run() -> None:
    t, _ = make(8)
    assert t.allocate(3, ticket=1, expires_ms=100) == [0, 1, 2]
    assert t.allocate(2, ticket=2, expires_ms=100) == [3, 4]
    assert (t.free_blocks, t.used_blocks, t.active) == (3, 5, 2)
    assert t.blocks_of(1) == [0, 1, 2]


def test_leases_allocate_fragmented_takes_lowest_free() -> None:
    t, _ = make(6)
    t.allocate(2, 1, 100)
    t.allocate(2, 2, 100)
    t.allocate(2, 3, 100)
    t.release(1)
    t.release(3)
    # free: 0,1 and 4,5 -> no run of 3
    assert t.allocate(3, 4, 100) == [0, 1, 4]


def test_leases_full_region_raises_region_full_and_counts() -> None:
    t, _ = make(4)
    t.allocate(3, 1, 100)
    with pytest.raises(RegionFull) as info:
        t.allocate(2, 2, 100)
    assert isinstance(info.value, Backpressure)
    assert t.rejected_total == 1
    assert t.blocks_of(2) is None and t.free_blocks == 1


def test_leases_release_is_idempotent_and_frees_blocks() -> None:
    t, freed = make(4)
    t.allocate(2, 7, 100)
    assert t.release(7) is True
    assert t.release(7) is False
    assert freed == [[0, 1]]
    assert t.free_blocks == 4 and t.released_total == 1
    # freed blocks are reusable under a new ticket
    assert t.allocate(4, 8, 100) == [0, 1, 2, 3]


def test_leases_expire_frees_only_due_leases() -> None:
    t, freed = make(8)
    t.allocate(1, 1, expires_ms=100)
    t.allocate(1, 2, expires_ms=200)
    t.allocate(1, 3, expires_ms=300)
    assert t.expire(99) == []
    assert sorted(t.expire(200)) == [1, 2]
    assert freed == [[0], [1]] and t.expired_total == 2
    assert t.blocks_of(3) == [2]
    assert t.release(1) is False  # already expired


def test_leases_renew_moves_expiry() -> None:
    t, _ = make(4)
    t.allocate(1, 1, expires_ms=100)
    assert t.renew(1, 500) is True
    assert t.expire(200) == []
    assert t.expires_at(1) == 500
    assert t.renew(1, NEVER)
    assert t.expire(10**15) == []
    assert t.renew(99, 5) is False


def test_leases_renew_earlier_expires_earlier() -> None:
    t, _ = make(4)
    t.allocate(1, 1, expires_ms=1000)
    t.renew(1, 10)
    assert t.expire(10) == [1]


def test_leases_bad_arguments_are_rejected() -> None:
    t, _ = make(4)
    with pytest.raises(ValueError):
        t.allocate(0, 1, 100)
    with pytest.raises(ValueError):
        t.allocate(1, 0, 100)
    t.allocate(1, 5, 100)
    with pytest.raises(ValueError):
        t.allocate(1, 5, 100)
    with pytest.raises(ValueError):
        LeaseTable(0)


def test_leases_expiry_heap_stays_bounded_under_renewals() -> None:
    t, _ = make(4)
    t.allocate(1, 1, 100)
    for i in range(10_000):
        t.renew(1, 100 + i)
    assert len(t._heap) <= 2 * t.active + 65
    assert t.expire(100 + 9_998) == []
    assert t.expire(100 + 9_999) == [1]


def test_leases_every_block_belongs_to_at_most_one_lease() -> None:
    t, _ = make(16)
    held: dict[int, list[int]] = {}
    ticket = 0
    for step in range(200):
        if step % 3 == 2 and held:
            victim = sorted(held)[step % len(held)]
            t.release(victim)
            del held[victim]
            continue
        ticket += 1
        try:
            held[ticket] = t.allocate(1 + step % 4, ticket, 10**9)
        except RegionFull:
            continue
        owned = [b for blocks in held.values() for b in blocks]
        assert len(owned) == len(set(owned))
        assert t.used_blocks == len(owned)
