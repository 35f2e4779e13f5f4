"""HolderTable (C) against HolderMap (its pure-Python reference): the same random operations,
everything observable compared after each one, and both checked for their invariants."""

from __future__ import annotations

import random

import pytest

from kvrelay.router import index as index_mod
from kvrelay.router.index_store import HolderMap
from kvrelay.schemas.kv_events import pack_hashes

HolderTable = index_mod.HolderTable


def test_holders_native_is_built() -> None:
    assert index_mod.NATIVE, "kvrelay.router._holders is not built: reinstall kvrelay with a C compiler"


class Tree:
    """Chains of unique hashes sharing prefixes, as chained block hashes do: a hash has one parent."""

    def __init__(self, rng: random.Random, roots: int, depth: int, chains: int) -> None:
        self.chains: list[list[int]] = []
        nxt = 1 << 40  # big values: they exercise the full 64-bit path too
        for i in range(chains):
            if i >= roots and rng.random() < 0.8:
                base = rng.choice(self.chains)[: rng.randrange(1, depth)]
            else:
                base = []
            own = [nxt + k * 7919 for k in range(depth - len(base))]
            nxt += 7919 * len(own) + 1
            self.chains.append(base + own)
        self.universe = sorted({h for c in self.chains for h in c})


def _same(a, b, tree: Tree, slots: list[int], rng: random.Random, closed: bool) -> None:
    """Everything observable equal; with consistent chains (``closed``), the binary-search match
    equals the linear walk too (what prefix closure is for)."""
    assert len(a) == len(b)
    assert a.counts() == b.counts()
    assert a.unlinked == b.unlinked
    for h in tree.universe:
        assert a.get(h) == b.get(h), h
    for s in slots:
        assert a.held(s) == b.held(s), s
        assert sorted(a.slot_hashes(s)) == sorted(b.slot_hashes(s)), s
    for _ in range(8):
        q = rng.choice(tree.chains)
        q = q[: rng.randrange(1, len(q) + 1)] + ([rng.getrandbits(64)] if rng.random() < 0.3 else [])
        assert a.match(q) == b.match(q), q
        assert a.match_linear(q) == b.match_linear(q), q
        if closed:
            assert a.match(q) == a.match_linear(q), q
    a.check()
    b.check()


def _op(m, rng: random.Random, tree: Tree, slots: list[int], hostile: bool) -> tuple:
    """One random operation, as arguments both implementations take. ``hostile``: some chains
    repeat a hash or hang under a random parent (links that would close cycles)."""
    slot, chain = rng.choice(slots), rng.choice(tree.chains)
    r = rng.random()
    if r < 0.45:
        k = rng.randrange(len(chain)) if rng.random() < 0.5 else 0
        end = rng.randrange(k + 1, len(chain) + 1)
        hashes, parent = chain[k:end], chain[k - 1] if k else None
        if hostile and rng.random() < 0.3:
            if rng.random() < 0.5:
                hashes = hashes + [rng.choice(hashes)]  # a repeat: the whole chain is refused
            else:
                parent = rng.choice(tree.universe)  # an inconsistent parent
        return ("store", slot, pack_hashes(hashes), parent)
    if r < 0.7:
        picks = rng.choices(tree.universe, k=rng.randrange(1, 6))  # repeats: one reference each
        return ("remove", slot, pack_hashes(picks))
    if r < 0.78:  # a snapshot lists a hash held twice twice
        return ("store_unlinked", slot, pack_hashes(rng.choices(tree.universe, k=rng.randrange(0, 8))))
    if r < 0.83:
        return ("sweep", slot)
    if r < 0.93:
        return ("touch", chain, rng.randrange(len(chain) + 1))
    return ("evict", rng.randrange(0, 5))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("hostile", [False, True], ids=["consistent", "hostile"])
@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [0, 5, 63, 64, 130]], ids=["one-word", "three-words"])
def test_holders_native_equals_python_reference_through_random_operations(seed: int, slots: list[int],
                                                                          hostile: bool) -> None:
    rng = random.Random(seed)
    tree = Tree(rng, roots=3, depth=12, chains=30)
    cap = rng.choice([16, 48, 1000])
    native, ref = HolderTable(cap, rng.getrandbits(64)), HolderMap(cap)
    usable = 0
    for s in slots:
        native.add_slot(s)
        ref.add_slot(s)
        usable |= 1 << s
    for m in (native, ref):
        m.set_usable(usable)
    for step in range(250):
        op = _op(native, rng, tree, slots, hostile)
        if step % 50 == 49:  # a stale worker: match must not report it
            usable ^= 1 << rng.choice(slots)
            native.set_usable(usable)
            ref.set_usable(usable)
        results = [getattr(m, op[0])(*op[1:]) for m in (native, ref)]
        assert results[0] == results[1], op
        _same(native, ref, tree, slots, rng, closed=not hostile)


def test_holders_native_rejects_bad_input() -> None:
    t = HolderTable(8, 1)
    t.add_slot(0)
    with pytest.raises(ValueError, match="multiple of 8"):
        t.store(0, b"1234567", None)
    with pytest.raises(ValueError, match="not registered"):
        t.store(1, pack_hashes([1]), None)
    with pytest.raises(ValueError, match="over the limit"):
        t.add_slot(70000)
    with pytest.raises(TypeError):
        t.match(["x"])
    with pytest.raises(OverflowError):
        t.match([-1])
    with pytest.raises(ValueError, match="past the highest"):
        t.set_usable(1 << 64)
    with pytest.raises(ValueError):
        HolderTable(0, 1)
    assert t.match([]) == [] and t.get(99) == 0 and len(t) == 0


def test_holders_native_cap_evicts_leaves_and_stays_bounded() -> None:
    t = HolderTable(100, 5)
    t.add_slot(0)
    t.set_usable(1)
    chain = list(range(1, 81))
    t.store(0, pack_hashes(chain), None)  # stored deepest first: its deepest block is the oldest
    for i in range(50):
        t.store(0, pack_hashes([10_000 + i]), None)
        assert len(t) <= 100
    t.check()
    assert t.counts()["evictions"] == 30
    assert t.match(chain) == [(1, 50)]  # the chain lost its 30 deepest blocks: no hole


def test_holders_native_memory_is_reported() -> None:
    t = HolderTable(1 << 16, 5)
    t.add_slot(0)
    before = t.nbytes()
    t.store(0, pack_hashes(range(1, 20_001)), None)
    assert t.nbytes() > before + 20_000 * 40  # nodes, masks, table cells


def test_holders_native_many_workers_at_many_depths() -> None:
    """300 workers (five mask words), each holding a different prefix of one 400-block chain:
    300 records, the binary search's pending stack far deeper than usual."""
    chain = [(1 << 50) + 97 * i for i in range(400)]
    native, ref = HolderTable(10_000, 3), HolderMap(10_000)
    rng = random.Random(5)
    depths = rng.sample(range(1, 401), 300)
    for m in (native, ref):
        for slot in range(300):
            m.add_slot(slot)
        m.set_usable((1 << 300) - 1)
        for slot, d in enumerate(depths):
            m.store(slot, pack_hashes(chain[:d]), None)
    records = native.match(chain)
    assert records == ref.match(chain) == ref.match_linear(chain) == native.match_linear(chain)
    assert len(records) == 300 and [d for _, d in records] == sorted(depths, reverse=True)
    native.check()


def test_holders_native_slots_out_of_range_raise_and_never_touch_memory() -> None:
    t = HolderTable(100, 1)
    t.add_slot(0)
    t.store(0, pack_hashes([5]), None)
    for bad in (2**32, 2**32 + 1, 70_000, 1):
        with pytest.raises(ValueError, match="not registered"):
            t.sweep(bad)
        with pytest.raises(ValueError, match="not registered"):
            t.slot_hashes(bad)
        with pytest.raises(ValueError, match="not registered"):
            t.store(bad, pack_hashes([6]), None)
    with pytest.raises(OverflowError):
        t.remove(-1, pack_hashes([5]))
    with pytest.raises(OverflowError):
        HolderTable(2**64 + 7, 1)
    assert t.get(5) == 1 and t.slot_hashes(0) == [5]


def test_holders_native_uninitialised_table_raises_instead_of_crashing() -> None:
    t = HolderTable.__new__(HolderTable)
    for call in (lambda: t.get(1), lambda: t.match([1]), lambda: t.store(0, b"", None), lambda: t.unlinked,
                 lambda: len(t), lambda: t.touch([1], 1), lambda: t.sweep(0), lambda: t.check()):
        with pytest.raises(RuntimeError, match="__init__"):
            call()


@pytest.mark.parametrize("impl", ["native", "python"])
def test_holders_chain_repeating_a_hash_is_refused(impl: str) -> None:
    m = HolderTable(100, 1) if impl == "native" else HolderMap(100)
    m.add_slot(0)
    m.set_usable(1)
    m.store(0, pack_hashes([4]), None)
    assert m.store(0, pack_hashes([1, 2, 1, 2]), 4) == 0  # chained hashes never repeat
    assert m.store(0, pack_hashes([7, 4]), 4) == 0  # nor repeat their parent
    assert m.counts()["bad_chains"] == 2 and len(m) == 1
    m.sweep(0)
    m.check()
    assert len(m) == 0


@pytest.mark.parametrize("impl", ["native", "python"])
def test_holders_links_that_would_close_a_cycle_are_refused_and_the_cap_holds(impl: str) -> None:
    """A worker whose chains contradict each other (b under a, then a under b) cannot make
    blocks that eviction can never remove (each would have a child)."""
    m = HolderTable(50, 1) if impl == "native" else HolderMap(50)
    m.add_slot(0)
    m.set_usable(1)
    for i in range(300):
        a, b = 1000 + 2 * i, 1001 + 2 * i
        m.store(0, pack_hashes([a]), None)
        m.store(0, pack_hashes([b]), a)
        m.store(0, pack_hashes([a]), b)  # held already; linking it under b would close a cycle
        assert len(m) <= 50 + 2
    assert m.counts()["refused_links"] == 300
    m.check()


@pytest.mark.parametrize("impl", ["native", "python"])
def test_holders_cap_never_evicts_the_block_a_chain_continues_from(impl: str) -> None:
    """A conversation that grows a block at a time in a full map keeps every block reachable
    (its tip used to be the oldest leaf, evicted just before the next block was stored under it)."""
    m = HolderTable(64, 1) if impl == "native" else HolderMap(64)
    m.add_slot(0)
    m.set_usable(1)
    m.store(0, pack_hashes(range(5000, 5064)), None)  # the map is full of another chain
    chain = list(range(1, 41))
    m.store(0, pack_hashes(chain[:1]), None)
    for i in range(1, len(chain)):
        assert m.store(0, pack_hashes([chain[i]]), chain[i - 1]) == 1
    assert m.counts()["orphan_blocks"] == 0
    assert m.match(chain) == [(1, 40)]
    assert len(m) <= 64


def test_holders_native_widest_masks() -> None:
    """Slot 65535: 1024 mask words; records and usable masks convert in linear time."""
    t, ref = HolderTable(1000, 1), HolderMap(1000)
    for m in (t, ref):
        for s in (0, 4097, 65535):
            m.add_slot(s)
        m.set_usable(1 | 1 << 4097 | 1 << 65535)
        m.store(65535, pack_hashes([1, 2, 3]), None)
        m.store(4097, pack_hashes([1, 2]), None)
        m.store(0, pack_hashes([1]), None)
    assert t.match([1, 2, 3]) == ref.match([1, 2, 3]) == [(1 << 65535, 3), (1 << 4097, 2), (1, 1)]
    assert t.get(1) == 1 | 1 << 4097 | 1 << 65535
