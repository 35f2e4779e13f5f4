"""The vLLM engine arguments kvrelay derives from its config (no engine is started)."""

from __future__ import annotations

import pytest

from kvrelay import models
from kvrelay.workers.config import DecodeConfig, EngineConfig, PrefillConfig
from kvrelay.workers.errors import EngineError
from kvrelay.workers.vllm_engine.params import ConnectorConfig
from kvrelay.workers.vllm_engine.runtime import VllmRuntime


def _engine() -> EngineConfig:
    return EngineConfig(model=str(models.resolve("tiny")), max_model_len=2048, max_num_seqs=8, kv_cache_gb=0.1)


def _nothing(notice, matched) -> None:
    pass


def test_runtime_prefill_chunk_sets_vllm_batched_tokens_with_chunked_prefill() -> None:
    """decode.prefill_chunk_tokens reaches vLLM as max_num_batched_tokens, chunked prefill on; 0
    leaves vLLM's own default."""
    chunked = VllmRuntime(_engine(), 32, ConnectorConfig(notify_path=""), _nothing, chunk_tokens=64)._vllm_config()
    assert chunked.scheduler_config.max_num_batched_tokens == 64
    assert chunked.scheduler_config.enable_chunked_prefill
    default = VllmRuntime(_engine(), 32, ConnectorConfig(notify_path=""), _nothing)._vllm_config()
    assert default.scheduler_config.max_num_batched_tokens > 64


def test_runtime_prefill_chunk_below_max_num_seqs_is_refused() -> None:
    with pytest.raises(EngineError, match="max_num_seqs"):
        VllmRuntime(_engine(), 32, ConnectorConfig(notify_path=""), _nothing, chunk_tokens=4)
    assert DecodeConfig.from_mapping({"prefill_chunk_tokens": 64}).prefill_chunk_tokens == 64


def test_runtime_long_prompt_step_tokens_sets_vllm_long_prefill_threshold() -> None:
    """prefill.long_prompt_step_tokens reaches vLLM as long_prefill_token_threshold (chunked prefill
    on), so a long prompt leaves room in each step for the prompts queued behind it; 0 = no cap."""
    capped = VllmRuntime(_engine(), 32, ConnectorConfig(notify_path=""), _nothing, chunk_tokens=512,
                         long_prompt_step_tokens=128)._vllm_config()
    assert capped.scheduler_config.long_prefill_token_threshold == 128
    assert capped.scheduler_config.max_num_batched_tokens == 512
    assert capped.scheduler_config.enable_chunked_prefill
    default = VllmRuntime(_engine(), 32, ConnectorConfig(notify_path=""), _nothing)._vllm_config()
    assert default.scheduler_config.long_prefill_token_threshold == 0


def test_runtime_long_prompt_step_above_max_model_len_is_refused() -> None:
    with pytest.raises(EngineError, match="max_model_len"):
        VllmRuntime(_engine(), 32, ConnectorConfig(notify_path=""), _nothing, long_prompt_step_tokens=4096)
    cfg = PrefillConfig.from_mapping({"chunk_tokens": 512, "long_prompt_step_tokens": 256})
    assert (cfg.chunk_tokens, cfg.long_prompt_step_tokens) == (512, 256)
