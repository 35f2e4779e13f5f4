"""What the engines and the connector inside vLLM tell each other.

Engine -> connector, per request, through ``SamplingParams(extra_args={"kv_transfer_params": ...})``:

    {"kvrelay_export": ExportParams}   prefill: copy this prompt's KV into these region blocks
    {"kvrelay_import": ImportParams}   decode: load this prompt's KV from the descriptor
    {"kvrelay_advance": AdvanceParams} decode: the prompt ends with output tokens another engine
                                       sampled: advance the request's grammar over them first
    {"kvrelay_pin": PinParams}         decode: keep this step's blocks for its session's next step

Connector -> engine: the final ``RequestOutput.kv_transfer_params`` says whether an export was
scheduled (``{"kvrelay_export": {"ticket": t, "scheduled": true}}``), and a UNIX datagram per
engine step carries the ``Notice`` of every finished export and import (``notify.py``).

Engine -> connector at start-up: ``ConnectorConfig``, as ``kv_connector_extra_config``.
All of these are typed structs, validated on receipt (unknown keys are errors).
"""

from __future__ import annotations

from typing import Literal

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.schemas.struct import Struct, limit, typed

EXPORT_KEY = "kvrelay_export"
IMPORT_KEY = "kvrelay_import"
ADVANCE_KEY = "kvrelay_advance"
PIN_KEY = "kvrelay_pin"


@typed
class ConnectorConfig(Struct):
    """``kv_connector_extra_config`` of a kvrelay engine."""

    notify_path: str = limit(max_len=107)  # UNIX datagram socket of the engine's main process
    # the export region the connector writes into (prefill side); "" = this engine exports nothing
    region: str = limit("", max_len=128)
    region_dir: str = limit("", max_len=4096)  # "" = /dev/shm
    layout: KVLayout | None = None  # the layout the engine computed; checked against the real cache
    transfer_timeout_s: float = limit(30.0, min=0.01, max=600.0)
    # threads loading KV; loads beyond them queue (at most one per request vLLM holds)
    load_workers: int = limit(2, min=1, max=16)
    load_cpus: str = limit("", max_len=256)  # cores the load threads run on ("" = the engine's)
    max_regions: int = limit(8, min=1, max=256)  # exporters' regions kept mapped at once
    # the transfer backends this engine reads with, best first (transport.kv.fetch negotiates)
    backends: list[str] = limit(["shm", "tcp"], max_len=8)
    debug_zero_kv: bool = False  # zero every loaded block (control: proves the KV is transferred)
    # session pins (pins.py): share of the KV blocks and sessions they may hold, longest TTL; 0 = none
    pin_budget: float = limit(0.0, min=0.0, max=0.9)
    pin_max_sessions: int = limit(256, min=0, max=1 << 20)
    pin_max_ttl_ms: int = limit(300_000, min=0)


@typed
class ExportParams(Struct):
    ticket: int = limit(min=1, max=(1 << 63) - 1)
    region_blocks: list[int] = limit(max_len=1 << 16)
    checksum: bool = False


@typed
class ImportParams(Struct):
    kv: KVDescriptor
    nonce: int = limit(min=1, max=(1 << 63) - 1)  # names this import in its Notice
    debug_zero_kv: bool = False


@typed
class AdvanceParams(Struct):
    """Output tokens at the end of the prompt (the prefill worker's first token, ...): a structured
    request's grammar accepts them before this engine samples, so its output continues theirs."""

    token_ids: list[int] = limit(max_len=1 << 16)


@typed
class PinParams(Struct):
    session: str = limit(max_len=256)  # the tenant-scoped session key
    ttl_ms: int = limit(min=0, max=86_400_000)  # 0: not pinned (its arrival still ends the session's pin)


@typed
class Notice(Struct):
    """The outcome of one export (``ticket``) or import (``nonce``)."""

    kind: Literal["export", "import", "pin"]  # pin: code is the outcome (pins.py), blocks its size
    ticket: int = limit(0, min=0)
    nonce: int = limit(0, min=0)
    ok: bool = True
    code: str = limit("", max_len=64)  # the KVTransferError code when not ok
    error: str = limit("", max_len=1024)
    blocks: int = limit(0, min=0)
    nbytes: int = limit(0, min=0)
    ms: float = limit(0.0, min=0.0)
    checksum: int | None = None
    loaded_tokens: int = limit(0, min=0)  # import: prompt tokens whose KV was loaded
    backend: str = limit("", max_len=16)  # import: the backend that moved the blocks
    skipped: list[str] = limit([], max_len=8)  # import: "backend:code" of backends tried first, unusable


def failed(
    kind: Literal["export", "import"], code: str, error: str, *, ticket: int = 0, nonce: int = 0
) -> Notice:
    return Notice(kind=kind, ticket=ticket, nonce=nonce, ok=False, code=code[:64], error=error[:1024])
