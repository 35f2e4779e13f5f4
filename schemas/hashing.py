"""Block hashes: the prefix identity that routers and workers must compute alike (wire contract).

Definition (``HASH_ALGO = "xxh64-chain-v1"``), for a block size ``B`` and a 64-bit chain root ``r``:

    block i      = token ids ``[i*B, (i+1)*B)`` as little-endian uint32 (``4*B`` bytes); full blocks only
    h_{-1}       = r
    h_i          = XXH64(block i, seed = h_{i-1})          (an unsigned 64-bit int)

Since each hash seeds the next, ``h_i`` names the whole prefix ``[0, (i+1)*B)``: a flat map
``hash -> holders`` answers "how many leading blocks does a worker hold" by walking until a miss.

The chain root keeps tenants apart (the cache-timing side channel) and makes a mismatched
configuration visible instead of silently missing:

    tenant_salt(secret, tenant) = BLAKE2b-128(tenant, key=secret, person="kvrelay-tenant")
    r = HashSpec(B, seed).root(salt) = BLAKE2b-64(salt, key=seed, person="kvrelay-root") (LE int)

The secret is server-side (router config); a tenant cannot compute another tenant's root, so
its prompts never produce another tenant's hashes. Without a secret (an empty key) the salt is
still per tenant, so tenants never share hashes, but anyone who knows a tenant's name can
compute its root: set ``cache.tenant_salt_secret`` in production. ``HashSpec.fingerprint`` (algorithm, block
size, seed digest) is compared when a worker registers: a mismatch is an error, never a 0 % hit
rate. XXH64 is not a MAC; the secrecy of the root is what separates tenants, and a collision
inside one tenant costs at worst one suboptimal routing decision (engines check their own KV).

Speed: ``kvrelay.schemas._chainhash`` (C, built with the package) hashes a list of token ids
in one call, converting and hashing block by block (about 3 µs for 2,048 tokens here); without
it, the pure-Python path below (one ``xxhash`` call per block after an ``array('I')``
conversion, about 19 µs) gives the same hashes: it is the reference the tests compare with.
``extend_block_hashes`` hashes only the new blocks of a longer prompt.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from sys import byteorder

from xxhash import xxh64_intdigest

from kvrelay.schemas.errors import SchemaError, ValidationError
from kvrelay.schemas.struct import Struct, limit, typed

try:
    from kvrelay.schemas import _chainhash as _native
except ImportError:  # not built (no C compiler at install): the pure-Python path serves
    _native = None

HASH_ALGO = "xxh64-chain-v1"
MAX_BLOCK_SIZE = 4096
_BIG_ENDIAN = byteorder == "big"


class HashSpecMismatch(SchemaError):
    """A worker hashes blocks differently from this router (block size, seed or algorithm)."""

    code = "hash_spec_mismatch"

    def __init__(self, worker_id: str, expected: str, got: str) -> None:
        super().__init__(f"worker {worker_id!r} hashes with {got!r}, this router with {expected!r}")
        self.worker_id = worker_id
        self.expected = expected
        self.got = got


def _as_bytes(value: bytes | str, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValidationError(what, f"expected str or bytes, got {type(value).__name__}")


def tenant_salt(secret: bytes | str, tenant: str) -> bytes:
    """The 16-byte salt of one tenant: a keyed hash of its name with the server-side secret."""
    key = _as_bytes(secret, "secret")
    if len(key) > 64:  # BLAKE2b keys are at most 64 bytes
        key = hashlib.blake2b(key, digest_size=64).digest()
    return hashlib.blake2b(
        _as_bytes(tenant, "tenant"), key=key, digest_size=16, person=b"kvrelay-tenant"
    ).digest()


@lru_cache(maxsize=4096)  # bounded: one entry per (seed, tenant salt) in use
def _root(seed: str, salt: bytes) -> int:
    key = hashlib.blake2b(seed.encode(), digest_size=32).digest()
    digest = hashlib.blake2b(salt, key=key, digest_size=8, person=b"kvrelay-root").digest()
    return int.from_bytes(digest, "little")


def _token_bytes(token_ids: Sequence[int], start: int, stop: int) -> bytes:
    """Tokens ``[start, stop)`` as little-endian uint32 bytes; bad ids raise ValidationError."""
    if type(token_ids) is array and token_ids.typecode == "I":  # type: ignore[attr-defined]
        arr = token_ids[start:stop]
    else:
        try:
            arr = array("I", token_ids[start:stop] if start or stop < len(token_ids) else token_ids)
        except (TypeError, OverflowError) as exc:
            raise ValidationError("token_ids", f"token ids must be ints in [0, 2**32): {exc}") from exc
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def _chain(buf: bytes, step: int, h: int, out: list[int]) -> list[int]:
    append = out.append
    for off in range(0, len(buf) - step + 1, step):
        h = xxh64_intdigest(buf[off : off + step], h)
        append(h)
    return out


def _check(block_size: int, root: int) -> None:
    if type(block_size) is not int or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValidationError("block_size", f"must be an int in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
    if type(root) is not int or not 0 <= root < 1 << 64:
        raise ValidationError("root", f"must be an unsigned 64-bit int, got {root!r}")


def _chain_native(token_ids: Sequence[int], block_size: int, seed: int, start: int) -> list[int] | None:
    """Hashes of blocks ``start..`` by the C chain (None when it cannot take ``token_ids``)."""
    if _native is None or type(token_ids) not in (list, tuple):
        return None
    try:
        return _native.chain_seq(token_ids, block_size, seed, start)
    except (TypeError, OverflowError) as exc:
        raise ValidationError("token_ids", f"token ids must be ints in [0, 2**32): {exc}") from exc


def block_hashes(token_ids: Sequence[int], block_size: int, root: int) -> list[int]:
    """Chained 64-bit hashes of every full block of ``token_ids``, chained from ``root``."""
    _check(block_size, root)
    fast = _chain_native(token_ids, block_size, root, 0)
    if fast is not None:
        return fast
    full = len(token_ids) // block_size * block_size
    if not full:
        return []
    return _chain(_token_bytes(token_ids, 0, full), 4 * block_size, root, [])


def extend_block_hashes(
    token_ids: Sequence[int], block_size: int, root: int, prev: Sequence[int]
) -> list[int]:
    """All block hashes of ``token_ids``, given ``prev``: the hashes of a prompt it extends.

    Only blocks past ``len(prev)`` are hashed. The caller vouches that ``prev`` came from the
    same root and the same leading tokens (the hash of block i names tokens ``[0, (i+1)*B)``).
    """
    _check(block_size, root)
    done = len(prev)
    full = len(token_ids) // block_size
    if done > full:
        raise ValidationError("prev", f"{done} hashes given for a prompt of {full} full blocks")
    out = list(prev)
    if done == full:
        return out
    h = prev[-1] if done else root
    fast = _chain_native(token_ids, block_size, h, done)
    if fast is not None:
        out.extend(fast)
        return out
    buf = _token_bytes(token_ids, done * block_size, full * block_size)
    return _chain(buf, 4 * block_size, h, out)


@dataclass(frozen=True)
class HashSpec:
    """How blocks are hashed: block size and seed. Workers and routers must agree exactly."""

    block_size: int
    seed: str = "kvrelay-v1"

    def __post_init__(self) -> None:
        _check(self.block_size, 0)
        if not isinstance(self.seed, str) or len(self.seed) > 64:
            raise ValidationError("seed", "must be a string of at most 64 characters")

    @property
    def fingerprint(self) -> str:
        """``algo/bs=B/seed=<digest>``: equal fingerprints hash alike (the seed itself stays out)."""
        digest = hashlib.blake2b(self.seed.encode(), digest_size=4).hexdigest()
        return f"{HASH_ALGO}/bs={self.block_size}/seed={digest}"

    def check(self, worker_id: str, fingerprint: str) -> None:
        """Raise HashSpecMismatch when a worker's fingerprint differs from ours."""
        if fingerprint != self.fingerprint:
            raise HashSpecMismatch(worker_id, self.fingerprint, fingerprint)

    def root(self, salt: bytes = b"") -> int:
        """The chain root for one tenant salt (cached, bounded)."""
        return _root(self.seed, bytes(salt))

    def hashes(self, token_ids: Sequence[int], salt: bytes = b"") -> list[int]:
        return block_hashes(token_ids, self.block_size, self.root(salt))

    def extend(self, token_ids: Sequence[int], prev: Sequence[int], salt: bytes = b"") -> list[int]:
        return extend_block_hashes(token_ids, self.block_size, self.root(salt), prev)


@typed
class CacheConfig(Struct):
    """The prefix-cache contract every router and worker of a deployment shares (config ``cache``).

    ``block_size`` is both the hashing block and the engines' KV page size; ``hash_seed`` salts
    every chain root; ``tenant_salt_secret`` keys each tenant's salt (server-side, never sent).
    A router and a worker that differ in the first two see different fingerprints (refused and
    counted); a different secret makes their hashes differ silently, so give every component the
    same config file.
    """

    block_size: int = limit(32, min=1, max=MAX_BLOCK_SIZE)  # vLLM's CPU attention needs a multiple of 32
    hash_seed: str = limit("kvrelay-v1", max_len=64)
    tenant_salt_secret: str = limit("", max_len=256)

    @property
    def spec(self) -> HashSpec:
        return HashSpec(self.block_size, self.hash_seed)

    def salt(self, tenant: str) -> bytes:
        """The tenant's salt under this deployment's secret."""
        return tenant_salt(self.tenant_salt_secret, tenant)
