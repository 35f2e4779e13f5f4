"""One vLLM ``AsyncLLM`` with kvrelay's connector: config, start/stop, sampling, scheduler stats.

The prefill and decode engines each own one. ``start`` resolves vLLM's config first (in a
thread: it imports and inspects the model), derives the KV layout from it, lets the caller act
on the layout (the prefill engine creates its export region there, before the engine and its
connector exist), then starts ``AsyncLLM`` in a thread (``from_vllm_config`` blocks ~15 s).
vLLM's EngineCore runs in a child process; the connector's notices come back over the
``NotifyReceiver`` socket this object owns.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvrelay.base.logs import get_logger
from kvrelay.schemas.messages import KVLayout, SamplingSpec, StructuredSpec
from kvrelay.workers.config import EngineConfig
from kvrelay.workers.errors import EngineDead, EngineError
from kvrelay.workers.vllm_engine import env
from kvrelay.workers.vllm_engine.notify import NotifyReceiver
from kvrelay.workers.vllm_engine.params import ConnectorConfig, Notice

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.engine.async_llm import AsyncLLM

log = get_logger(__name__)

CONNECTOR_MODULE = "kvrelay.workers.vllm_engine.connector"
CONNECTOR_CLASS = "KVRelayConnector"
GIB = 1 << 30


@dataclass
class SchedStats:
    """The last scheduler stats vLLM reported (updated every engine step that logs stats)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


def _stat_logger(sink: SchedStats) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Probe(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            if scheduler_stats is not None:
                sink.running = scheduler_stats.num_running_reqs
                sink.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                sink.kv_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return _Probe


class VllmRuntime:
    def __init__(
        self,
        cfg: EngineConfig,
        block_size: int,
        connector: ConnectorConfig | dict[str, Any],
        on_notice: Callable[[Notice, bool], None],
        chunk_tokens: int = 0,
        long_prompt_step_tokens: int = 0,
    ) -> None:
        if cfg.kind != "vllm":
            raise EngineError(f"engine kind {cfg.kind!r} is not vllm")
        if not cfg.model:
            raise EngineError("engine.model (a model folder) is not set")
        if 0 < chunk_tokens < cfg.max_num_seqs:
            raise EngineError(f"a prefill chunk of {chunk_tokens} tokens is below engine.max_num_seqs "
                              f"({cfg.max_num_seqs}): vLLM needs room for one token per running request")
        if long_prompt_step_tokens > cfg.max_model_len:
            raise EngineError(f"a long prompt's step share of {long_prompt_step_tokens} tokens is above "
                              f"engine.max_model_len ({cfg.max_model_len})")
        self.cfg = cfg
        self.block_size = block_size  # the deployment's cache.block_size: vLLM's page size too
        self.chunk_tokens = chunk_tokens  # max_num_batched_tokens (0: vLLM's default)
        self.long_prompt_step_tokens = long_prompt_step_tokens  # long_prefill_token_threshold (0: none)
        # the notify path is filled in by start(); the rest is the caller's
        self._connector = dict(
            connector.to_mapping() if isinstance(connector, ConnectorConfig) else connector
        )
        self._on_notice = on_notice
        self.receiver: NotifyReceiver | None = None
        self.llm: AsyncLLM | None = None
        self.layout: KVLayout | None = None
        self.num_blocks = 0
        self.sched = SchedStats()
        self.kv_events_config: dict[str, Any] | None = None  # vLLM KVEventsConfig fields (kv_events.py)

    async def start(self, before_engine: Callable[[KVLayout], None] | None = None) -> None:
        env.apply(self.cfg.cpu_bind)
        self.receiver = NotifyReceiver(self._on_notice)
        self.receiver.start(asyncio.get_running_loop())
        self._connector["notify_path"] = self.receiver.path
        try:
            vc = await asyncio.wait_for(asyncio.to_thread(self._vllm_config), self.cfg.startup_timeout_s)
            from kvrelay.workers.vllm_engine.layout import layout_from_vllm_config

            self.layout = layout_from_vllm_config(vc)
            vc.kv_transfer_config.kv_connector_extra_config["layout"] = self.layout.to_mapping()
            if before_engine is not None:
                before_engine(self.layout)
            self.llm = await asyncio.wait_for(
                asyncio.to_thread(self._make_llm, vc), self.cfg.startup_timeout_s
            )
        except BaseException:
            await self.stop()
            raise
        self.num_blocks = int(self.llm.vllm_config.cache_config.num_gpu_blocks or 0)
        log.info(
            "vllm_started", model=self.cfg.model, layout=self.layout.to_mapping(), kv_blocks=self.num_blocks
        )

    def _vllm_config(self) -> VllmConfig:
        from vllm.engine.arg_utils import AsyncEngineArgs

        c = self.cfg
        extra: dict[str, Any] = {}
        if self.kv_events_config is not None:
            from vllm.config import KVEventsConfig

            extra["kv_events_config"] = KVEventsConfig(**self.kv_events_config)
        if self.chunk_tokens:
            extra |= {"max_num_batched_tokens": self.chunk_tokens, "enable_chunked_prefill": True}
        if self.long_prompt_step_tokens:
            extra |= {"long_prefill_token_threshold": self.long_prompt_step_tokens,
                      "enable_chunked_prefill": True}
        args = AsyncEngineArgs(
            model=c.model,
            served_model_name=c.served_model_name or None,
            block_size=self.block_size,
            max_model_len=c.max_model_len,
            max_num_seqs=c.max_num_seqs,
            kv_cache_memory_bytes=int(c.kv_cache_gb * GIB),
            dtype=env.resolve_dtype(c.dtype),
            enforce_eager=c.enforce_eager,
            seed=c.seed,
            enable_prefix_caching=c.enable_prefix_caching,
            kv_transfer_config={
                "kv_connector": CONNECTOR_CLASS,
                "kv_connector_module_path": CONNECTOR_MODULE,
                "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": self._connector,
            },
            **extra,
        )
        return args.create_engine_config()

    def _make_llm(self, vc: VllmConfig) -> AsyncLLM:
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_vllm_config(vc, stat_loggers=[_stat_logger(self.sched)])

    async def stop(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            # stop vLLM's output task first, or it reports the engine's exit as a failure
            handler = getattr(llm, "output_handler", None)
            if handler is not None and not handler.done():
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
            await asyncio.to_thread(llm.shutdown)
            del llm
            gc.collect()  # AsyncLLM sits in reference cycles; collect it now, not at interpreter exit
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None

    def engine(self) -> AsyncLLM:
        if self.llm is None:
            raise EngineDead("the vLLM engine is not running")
        if self.llm.errored:
            raise EngineDead("the vLLM engine died")
        return self.llm

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    async def reset_prefix_cache(self) -> bool:
        """Drop vLLM's prefix cache; False (nothing dropped) while any KV block is still held."""
        return bool(await self.engine().reset_prefix_cache())

    @property
    def free_kv_blocks(self) -> int:
        usable = max(self.num_blocks - 1, 0)  # vLLM keeps one null block
        return round((1.0 - self.sched.kv_usage) * usable)


def sampling_params(
    spec: SamplingSpec, *, max_tokens: int, kv_params: dict[str, Any] | None, delta: bool
) -> SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=max_tokens,
        skip_special_tokens=spec.skip_special_tokens,
        structured_outputs=structured_outputs(spec.structured),
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        seed=spec.seed,
        stop=list(spec.stop) or None,
        ignore_eos=spec.ignore_eos,
        output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        extra_args={"kv_transfer_params": kv_params} if kv_params else None,
    )


def structured_outputs(spec: StructuredSpec | None) -> Any:
    """vLLM's ``StructuredOutputsParams`` for a wire ``StructuredSpec`` (None for none)."""
    if spec is None:
        return None
    import json

    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(
        json=json.loads(spec.json) if spec.json is not None else None,
        json_object=spec.json_object or None, regex=spec.regex, choice=spec.choice, grammar=spec.grammar,
        structural_tag=spec.structural_tag, disable_any_whitespace=spec.disable_any_whitespace,
        disable_additional_properties=spec.disable_additional_properties,
    )


def translate(exc: Exception) -> Exception:
    """vLLM's errors as worker errors (raise the result ``from exc``)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        return EngineDead(f"vLLM engine died: {exc}")
    return EngineError(f"vLLM failed the request: {exc!r}")
