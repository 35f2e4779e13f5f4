"""What a prefill or decode worker needs of an engine. vLLM and the simulated engine implement it.

The worker services (``prefill.py``, ``decode.py``) own all bus I/O; engines own compute and
KV memory. A prefill engine exports a finished prefill's KV into memory it controls and
describes it with a ``KVDescriptor``; the blocks stay held until ``release`` or until the
lease expires. A decode engine imports the KV named by a ``PrefillDone`` and streams tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from kvrelay.schemas.messages import KVDescriptor, KVLayout, PrefillDone, PrefillTask


@dataclass(frozen=True)
class EngineInfo:
    model: str  # served model name
    block_size: int
    hash_seed: str
    layout: KVLayout | None  # None when the engine exports no KV (e.g. decode-only)
    backends: tuple[str, ...]  # transfer backends this engine serves / reads
    max_model_len: int


@dataclass(frozen=True)
class PrefillOutput:
    first_token_id: int
    text: str
    # set when the request already finished during prefill (EOS, stop string, max_tokens=1);
    # then there is nothing to decode and ``kv`` is None (no blocks were held)
    finish_reason: str | None
    kv: KVDescriptor | None
    cached_tokens: int = 0
    prefill_ms: float = 0.0


@dataclass(frozen=True)
class TokenDelta:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # set on the first delta: how the prompt's KV got there
    kv_loaded_tokens: int = 0  # tokens whose KV came from the prefill worker
    kv_recomputed: bool = False  # the transfer failed and the engine recomputed the prompt
    # set on the first delta of a local prefill (``stream_local``): prompt tokens found in this
    # engine's prefix cache (not computed)
    cached_tokens: int = 0


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    free_kv_blocks: int = 0
    exported_blocks: int = 0  # blocks held for decode workers (prefill side)
    export_free_blocks: int = 0
    kv_bytes_moved: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class PrefillEngine(Protocol):
    info: EngineInfo

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def prefill(self, task: PrefillTask) -> PrefillOutput:
        """Compute the prompt's KV and the first token; export and lease the KV (unless finished).

        Raises ``workers.errors.ExportFull`` when the export region has no room (push back).
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    def release(self, ticket: int) -> bool:
        """Free the blocks exported under ``ticket``; False if already free (idempotent)."""
        ...

    def expire_leases(self, now_ms: int) -> int:
        """Free every export whose lease ran out; returns how many were freed."""
        ...

    def stats(self) -> EngineStats: ...


class DecodeEngine(Protocol):
    info: EngineInfo

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    def stream(self, done: PrefillDone) -> AsyncIterator[TokenDelta]:
        """Import the KV ``done.kv`` names, then yield tokens after ``done.first_token_id``.

        A failed import falls back to recomputing the prompt locally (``kv_recomputed``);
        the stream still completes.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...


class LocalPrefillEngine(Protocol):
    """Optional: a decode engine that can also run a whole request itself (decode affinity).

    The decode worker service offers local prefill (``kvrelay.<ns>.local.<worker>``) only when
    its engine has ``stream_local``.
    """

    def stream_local(self, task: PrefillTask) -> AsyncIterator[TokenDelta]:
        """Compute the prompt here (blocks in this engine's prefix cache are not recomputed) and
        yield every output token, the first one included; the first delta's ``cached_tokens``
        says how many prompt tokens were cached. Ends with a delta carrying ``finish_reason``."""
        ...
