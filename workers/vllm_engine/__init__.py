"""kvrelay.workers.vllm_engine."""
