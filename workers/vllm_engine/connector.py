"""``KVRelayConnector``: kvrelay's vLLM KV connector (``KVConnectorBase_V1``), for both roles.

Loaded by vLLM from ``kv_connector_module_path="kvrelay.workers.vllm_engine.connector"`` with
``kv_connector="KVRelayConnector"``, ``kv_role="kv_both"`` and ``kv_load_failure_policy="recompute"``;
configured by ``kv_connector_extra_config`` (``params.ConnectorConfig``). What it does for a
request depends on the request's ``kv_transfer_params`` (``params.py``):

export (prefill, ``kvrelay_export``): nothing is loaded. When the request stops *for length*
  (max_tokens=1 reached; not EOS, stop or abort), ``request_finished`` queues a save and keeps
  vLLM's blocks for one more step; the worker half copies them into the export region then,
  sets the tickets, notifies the engine and reports ``finished_sending`` so vLLM frees them.
import (decode, ``kvrelay_import``): the prompt is the prefill's prompt plus its first token;
  ``get_num_new_matched_tokens`` claims the prefill's ``num_tokens`` (minus the block-aligned
  prefix-cache hit) as loaded asynchronously, so vLLM computes only the last token. The worker
  half loads in a thread and always reports ``finished_recving``; a failed load reports its
  blocks through ``get_block_ids_with_load_errors`` and vLLM recomputes them locally
  (``kv_load_failure_policy="recompute"``). A request is offered for loading once: after a
  failure vLLM's retry gets ``(0, False)``.
advance (decode, ``kvrelay_advance``): the prompt ends with output tokens the prefill worker
  sampled under the request's structured-output grammar. vLLM feeds a grammar only the tokens
  it samples itself, so when the request is first scheduled (its grammar compiled by then) the
  grammar accepts those tokens once; the next token is sampled in the state after them.
pin (decode, ``kvrelay_pin``): a session's step keeps its blocks after it finishes (``pins.py``):
  ``request_finished`` delays their free within the pin budget; the session's next request
  (seen in ``get_num_new_matched_tokens``, after its prefix-cache lookup), the TTL or the budget
  ends the pin, and the worker half reports the request as finished sending so vLLM frees them.

The scheduler half keeps per-request state only for requests vLLM holds (dropped in
``request_finished``), so it is bounded by vLLM's own limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.request import RequestStatus

from kvrelay.base.ids import now_ms
from kvrelay.base.logs import get_logger
from kvrelay.schemas.errors import SchemaError
from kvrelay.transport.errors import LayoutMismatch
from kvrelay.transport.kv.region import layout_fingerprint
from kvrelay.workers.vllm_engine.connector_worker import ConnectorWorker, LoadSpec, SaveSpec
from kvrelay.workers.vllm_engine.layout import layout_from_vllm_config
from kvrelay.workers.vllm_engine.notify import NotifySender
from kvrelay.workers.vllm_engine.pins import PinTable
from kvrelay.workers.vllm_engine.params import (
    ADVANCE_KEY,
    EXPORT_KEY,
    IMPORT_KEY,
    PIN_KEY,
    AdvanceParams,
    ConnectorConfig,
    ExportParams,
    ImportParams,
    Notice,
    PinParams,
    failed,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = get_logger(__name__)


@dataclass
class KVRelayMeta(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    unpins: list[str] = field(default_factory=list)  # pinned requests whose blocks may be freed now


@dataclass
class _Import:
    params: ImportParams | None
    error: str = ""
    started: bool = False


def _blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class KVRelayConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self._cfg = ConnectorConfig.from_mapping(extra, path="kv_connector_extra_config")
        self._layout = layout_from_vllm_config(vllm_config)
        if self._cfg.layout is not None and self._cfg.layout != self._layout:
            raise LayoutMismatch(
                f"engine expects {self._cfg.layout.to_mapping()}, vLLM has {self._layout.to_mapping()}"
            )
        self._fp = layout_fingerprint(self._layout)
        self._bs = vllm_config.cache_config.block_size
        self._sender = NotifySender(self._cfg.notify_path)
        self._worker = (
            ConnectorWorker(self._cfg, self._layout, self._sender) if role == KVConnectorRole.WORKER else None
        )
        self._saves: list[SaveSpec] = []
        self._loads: list[LoadSpec] = []
        self._imports: dict[str, _Import] = {}
        self._advanced: set[str] = set()  # requests whose grammar accepted their prompt's output tokens
        c = self._cfg
        self._pins = PinTable(int(c.pin_budget * kv_cache_config.num_blocks), c.pin_max_sessions, c.pin_max_ttl_ms)
        self._unpins: list[str] = []
        self._notices: list[Notice] = []

    # ======================= scheduler side =======================
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        self._advance(request)
        pin = _pin_of(request)
        if pin is not None:
            self._end_pins(self._pins.arrive(pin.session))
        imp = self._import_of(request)
        if imp is None or imp.started or imp.params is None:
            return 0, False
        need = imp.params.kv.num_tokens
        if num_computed_tokens >= need:
            return 0, False
        return need - num_computed_tokens, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        imp = self._imports.get(request.request_id)
        if imp is None or imp.started:
            return
        imp.started = True
        p = imp.params
        if p is None:
            self._notices.append(failed("import", "invalid", imp.error, nonce=_nonce_of(request)))
            return
        if num_external_tokens == 0:  # this engine's prefix cache holds it all
            self._notices.append(Notice(kind="import", ticket=p.kv.ticket, nonce=p.nonce))
            return
        need = p.kv.num_tokens
        cached = need - num_external_tokens  # vLLM passes block-aligned prefix-cache hits
        first = cached // self._bs
        ids = blocks.get_block_ids()[0]
        dst = list(ids[first : _blocks_for(need, self._bs)])
        # a misaligned prefix-cache hit would make the load overwrite local KV: fail it, vLLM recomputes
        error = f"prefix-cache hit of {cached} tokens is not block aligned" if cached % self._bs else ""
        spec = LoadSpec(request.request_id, p.kv.to_mapping(), first, dst, p.nonce, p.debug_zero_kv, error)
        self._loads.append(spec)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        if len(self._pins):
            self._end_pins(self._pins.expire(now_ms()))
        meta = KVRelayMeta(saves=self._saves, loads=self._loads, unpins=self._unpins)
        self._saves, self._loads, self._unpins = [], [], []
        if self._notices:
            notices, self._notices = self._notices, []
            self._sender.send(notices)
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._imports.pop(request.request_id, None)
        self._advanced.discard(request.request_id)
        raw = (request.kv_transfer_params or {}).get(EXPORT_KEY)
        if raw is None:
            return self._pin(request, block_ids), None
        try:
            exp = ExportParams.from_mapping(raw, path=EXPORT_KEY)
        except SchemaError as exc:
            log.warning("bad_export_params", error=str(exc))
            return False, {EXPORT_KEY: {"scheduled": False, "error": str(exc)}}
        n = request.num_prompt_tokens
        nb = _blocks_for(n, self._bs)
        if request.status != RequestStatus.FINISHED_LENGTH_CAPPED or request.num_computed_tokens < n:
            return False, None  # EOS, stop or abort: nothing to export
        if len(exp.region_blocks) != nb or len(block_ids) < nb:
            error = (
                f"{n} tokens need {nb} blocks; region gave {len(exp.region_blocks)}, vLLM {len(block_ids)}"
            )
            return False, {EXPORT_KEY: {"ticket": exp.ticket, "scheduled": False, "error": error}}
        self._saves.append(
            SaveSpec(request.request_id, list(block_ids[:nb]), exp.region_blocks, exp.ticket, exp.checksum)
        )
        return True, {EXPORT_KEY: {"ticket": exp.ticket, "scheduled": True}}

    def _pin(self, request: Request, block_ids: list[int]) -> bool:
        """Whether a finished request keeps its blocks for its session's next step (delayed free)."""
        pin = _pin_of(request)
        done = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        if pin is None or pin.ttl_ms <= 0 or request.status not in done:
            return False
        decision = self._pins.offer(pin.session, request.request_id, len(block_ids), pin.ttl_ms, now_ms())
        self._end_pins(decision.ended)
        outcome = "pinned" if decision.pinned else "refused"
        self._notices.append(Notice(kind="pin", code=outcome, blocks=len(block_ids)))
        return decision.pinned

    def _end_pins(self, ended: list[tuple[str, str, int]]) -> None:
        for req_id, outcome, blocks in ended:
            self._unpins.append(req_id)
            self._notices.append(Notice(kind="pin", code=outcome, blocks=blocks))

    def _advance(self, request: Request) -> None:
        """Once per request: its grammar accepts the output tokens its prompt ends with."""
        raw = (request.kv_transfer_params or {}).get(ADVANCE_KEY)
        if raw is None or request.request_id in self._advanced:
            return
        self._advanced.add(request.request_id)
        so = request.structured_output_request
        grammar = so.grammar if so is not None else None
        if grammar is None or isinstance(grammar, Exception):
            return  # not structured (or its grammar failed: vLLM fails the request itself)
        try:
            tokens = AdvanceParams.from_mapping(raw, path=ADVANCE_KEY).token_ids
        except SchemaError as exc:
            log.error("bad_advance_params", error=str(exc))
            return
        if tokens and not grammar.accept_tokens(request.request_id, tokens):
            log.error("grammar_rejected_prefix", request_id=request.request_id, token_ids=tokens)

    def _import_of(self, request: Request) -> _Import | None:
        imp = self._imports.get(request.request_id)
        if imp is not None:
            return imp
        raw = (request.kv_transfer_params or {}).get(IMPORT_KEY)
        if raw is None:
            return None
        try:
            params = ImportParams.from_mapping(raw, path=IMPORT_KEY)
            self._check_import(request, params)
            imp = _Import(params)
        except (SchemaError, LayoutMismatch) as exc:
            log.warning("bad_import_params", error=str(exc))
            imp = _Import(None, error=str(exc))
        self._imports[request.request_id] = imp
        return imp

    def _check_import(self, request: Request, p: ImportParams) -> None:
        kv = p.kv
        if layout_fingerprint(kv.layout) != self._fp:
            raise LayoutMismatch(
                f"exported layout {kv.layout.to_mapping()} is not {self._layout.to_mapping()}"
            )
        if kv.num_tokens != request.num_prompt_tokens - 1:
            raise LayoutMismatch(
                f"export holds {kv.num_tokens} tokens; the prompt needs {request.num_prompt_tokens - 1}"
            )
        if len(kv.block_ids) != _blocks_for(kv.num_tokens, self._bs):
            raise LayoutMismatch(f"{kv.num_tokens} tokens need {_blocks_for(kv.num_tokens, self._bs)} blocks")

    # ======================= worker side =======================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, KVRelayMeta):
            if meta.loads:
                self._worker.start_load(meta.loads)
            if meta.unpins:
                self._worker.unpin(meta.unpins)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: vLLM schedules a request only after finished_recving

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # whole blocks are copied one step later, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, KVRelayMeta) and meta.saves:
            self._worker.save(meta.saves)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self._worker is None:
            return KVConnectorTransferResults()
        sending, recving = self._worker.results()
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_invalid() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        else:
            self._sender.close()


def _pin_of(request: Request) -> PinParams | None:
    raw = (request.kv_transfer_params or {}).get(PIN_KEY)
    if raw is None:
        return None
    try:
        return PinParams.from_mapping(raw, path=PIN_KEY)
    except SchemaError as exc:
        log.warning("bad_pin_params", error=str(exc))
        return None


def _nonce_of(request: Request) -> int:
    raw = (request.kv_transfer_params or {}).get(IMPORT_KEY)
    nonce = raw.get("nonce") if isinstance(raw, dict) else None
    return nonce if type(nonce) is int and 0 < nonce < (1 << 63) else 0
