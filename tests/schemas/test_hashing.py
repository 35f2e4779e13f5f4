"""Block hashing: the definition (checked against a pure-Python XXH64), chaining, salts, specs."""

from __future__ import annotations

import random
import struct
from array import array

import pytest

from kvrelay.schemas import hashing
from kvrelay.schemas.errors import ValidationError
from kvrelay.schemas.hashing import (
    HASH_ALGO,
    HashSpec,
    HashSpecMismatch,
    block_hashes,
    extend_block_hashes,
    tenant_salt,
)

_M = (1 << 64) - 1
_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                           0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M, 31) * _P1) & _M


def _merge(acc: int, val: int) -> int:
    return ((acc ^ _round(0, val)) * _P1 + _P4) & _M


def xxh64_reference(data: bytes, seed: int) -> int:
    """XXH64 written from its specification, independent of the xxhash package."""
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M, (seed + _P2) & _M, seed, (seed - _P1) & _M]
        while i + 32 <= n:
            for j in range(4):
                v[j] = _round(v[j], struct.unpack_from("<Q", data, i + 8 * j)[0])
            i += 32
        acc = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for lane in v:
            acc = _merge(acc, lane)
    else:
        acc = (seed + _P5) & _M
    acc = (acc + n) & _M
    while i + 8 <= n:
        acc = (_rotl(acc ^ _round(0, struct.unpack_from("<Q", data, i)[0]), 27) * _P1 + _P4) & _M
        i += 8
    if i + 4 <= n:
        acc = (_rotl(acc ^ (struct.unpack_from("<I", data, i)[0] * _P1 & _M), 23) * _P2 + _P3) & _M
        i += 4
    while i < n:
        acc = (_rotl(acc ^ (data[i] * _P5 & _M), 11) * _P1) & _M
        i += 1
    acc ^= acc >> 33
    acc = acc * _P2 & _M
    acc ^= acc >> 29
    acc = acc * _P3 & _M
    return acc ^ (acc >> 32)


@pytest.fixture(autouse=True, params=["native", "python"])
def impl(request, monkeypatch) -> str:
    """Every test runs on the C chain (kvrelay.schemas._chainhash) and on the pure-Python path."""
    if request.param == "python":
        monkeypatch.setattr(hashing, "_native", None)
    else:
        assert hashing._native is not None, "kvrelay.schemas._chainhash is not built (no C compiler?)"
    return request.param


def test_xxh64_native_equals_the_reference_on_every_length(impl: str) -> None:
    if impl == "python":
        return  # the C function alone; the python path is the xxhash package
    rng = random.Random(11)
    for n in [*range(0, 80), 127, 128, 129, 1000]:
        data, seed = rng.randbytes(n), rng.getrandbits(64)
        assert hashing._native.xxh64(data, seed) == xxh64_reference(data, seed), n
    assert hashing._native.chain_bytes(b"", 128, 1) == []


def test_xxh64_reference_known_vectors() -> None:
    assert xxh64_reference(b"", 0) == 0xEF46DB3751D8E999
    assert xxh64_reference(b"abc", 0) == 0x44BC2CF5AD770999


@pytest.mark.parametrize("block_size", [1, 3, 8, 16, 32])
def test_block_hashes_follow_the_definition(block_size: int) -> None:
    rng = random.Random(block_size)
    tokens = [rng.randrange(1 << 32) for _ in range(block_size * 5 + 2)]
    root = rng.getrandbits(64)
    expected, h = [], root
    for i in range(len(tokens) // block_size):
        block = struct.pack(f"<{block_size}I", *tokens[i * block_size:(i + 1) * block_size])
        h = xxh64_reference(block, h)
        expected.append(h)
    assert block_hashes(tokens, block_size, root) == expected


def test_block_hashes_full_blocks_only() -> None:
    assert block_hashes(list(range(31)), 32, 7) == []
    assert len(block_hashes(list(range(65)), 32, 7)) == 2


def test_block_hashes_name_the_whole_prefix() -> None:
    a = list(range(96))
    b = list(a)
    b[5] += 1  # differs in block 0 only
    ha, hb = block_hashes(a, 32, 1), block_hashes(b, 32, 1)
    assert all(x != y for x, y in zip(ha, hb))  # every later block differs too
    c = a[:64] + [9] * 32
    assert block_hashes(c, 32, 1)[:2] == ha[:2] and block_hashes(c, 32, 1)[2] != ha[2]


def test_block_hashes_accept_tuples_and_uint32_arrays() -> None:
    tokens = list(range(100, 228))
    expected = block_hashes(tokens, 32, 5)
    assert block_hashes(tuple(tokens), 32, 5) == expected
    assert block_hashes(array("I", tokens), 32, 5) == expected


@pytest.mark.parametrize("bad", [[-1] * 32, [1 << 32] * 32, [1.5] * 32, ["a"] * 32])
def test_block_hashes_reject_bad_token_ids(bad: list) -> None:
    with pytest.raises(ValidationError, match="token ids"):
        block_hashes(bad, 32, 0)


@pytest.mark.parametrize(("block_size", "root"), [(0, 0), (5000, 0), (32, -1), (32, 1 << 64), (True, 0)])
def test_block_hashes_reject_bad_parameters(block_size: int, root: int) -> None:
    with pytest.raises(ValidationError):
        block_hashes([1] * 64, block_size, root)


def test_extend_block_hashes_hashes_only_new_blocks() -> None:
    rng = random.Random(3)
    tokens = [rng.randrange(50000) for _ in range(32 * 7 + 5)]
    full = block_hashes(tokens, 32, 11)
    prev = block_hashes(tokens[:32 * 3 + 10], 32, 11)
    assert extend_block_hashes(tokens, 32, 11, prev) == full
    assert extend_block_hashes(tokens, 32, 11, []) == full
    assert extend_block_hashes(tokens, 32, 11, full) == full
    # prev is trusted: a wrong prev shows in every new hash, proving only new blocks were hashed
    forged = extend_block_hashes(tokens, 32, 11, prev[:2] + [123])
    assert forged[:3] == prev[:2] + [123]
    assert all(x != y for x, y in zip(forged[3:], full[3:]))


def test_extend_block_hashes_rejects_prev_longer_than_prompt() -> None:
    with pytest.raises(ValidationError, match="prev"):
        extend_block_hashes([1] * 64, 32, 0, [1, 2, 3])


def test_tenant_salt_separates_tenants_and_secrets() -> None:
    a, b = tenant_salt("s3cret", "alice"), tenant_salt("s3cret", "bob")
    assert len(a) == 16 and a != b
    assert tenant_salt(b"s3cret", "alice") == a  # str and bytes secrets agree
    assert tenant_salt("other", "alice") != a
    assert tenant_salt("x" * 200, "alice") != tenant_salt("x" * 199, "alice")  # long keys still count
    assert tenant_salt("", "alice") != tenant_salt("", "bob")  # no secret: still one salt per tenant


def test_hash_spec_root_gives_tenants_disjoint_hashes() -> None:
    spec = HashSpec(32, "seed")
    tokens = list(range(32 * 8))
    alice = spec.hashes(tokens, tenant_salt("k", "alice"))
    bob = spec.hashes(tokens, tenant_salt("k", "bob"))
    assert not set(alice) & set(bob)
    assert spec.hashes(tokens, tenant_salt("k", "alice")) == alice  # deterministic


def test_hash_spec_seed_and_block_size_change_everything() -> None:
    tokens, salt = list(range(32 * 4)), tenant_salt("k", "t")
    base = HashSpec(32, "a").hashes(tokens, salt)
    assert not set(base) & set(HashSpec(32, "b").hashes(tokens, salt))
    assert not set(base) & set(HashSpec(16, "a").hashes(tokens, salt))


def test_hash_spec_fingerprint_names_algo_block_size_and_seed() -> None:
    fp = HashSpec(32, "kvrelay-v1").fingerprint
    assert fp.startswith(f"{HASH_ALGO}/bs=32/seed=") and "kvrelay-v1" not in fp
    assert fp == HashSpec(32, "kvrelay-v1").fingerprint
    assert fp != HashSpec(16, "kvrelay-v1").fingerprint
    assert fp != HashSpec(32, "kvrelay-v2").fingerprint


def test_hash_spec_check_raises_a_typed_mismatch() -> None:
    spec = HashSpec(32)
    spec.check("w1", spec.fingerprint)
    with pytest.raises(HashSpecMismatch) as err:
        spec.check("w1", HashSpec(16).fingerprint)
    assert err.value.worker_id == "w1" and "bs=16" in str(err.value)
    assert err.value.code == "hash_spec_mismatch"


def test_hash_spec_extend_matches_hashes() -> None:
    spec, salt = HashSpec(8), tenant_salt("k", "t")
    tokens = list(range(100))
    assert spec.extend(tokens, spec.hashes(tokens[:40], salt), salt) == spec.hashes(tokens, salt)


@pytest.mark.parametrize("kwargs", [{"block_size": 0}, {"block_size": 32, "seed": "x" * 65}])
def test_hash_spec_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        HashSpec(**kwargs)
