"""The simulated engine's cost model: how long prefill, a decode step and a KV transfer take.

    prefill_s(new, cached) = prefill_fixed_s + new / prefill_tokens_per_s
                             + prefill_attn_s * new * (cached + new / 2)
    decode_step_s(batch)   = decode_fixed_s + decode_per_seq_s * batch       (one token per sequence)
    forward_s(batch, chunks) = sum over chunks of the new tokens' terms of prefill_s, plus ONE fixed
                             cost: decode_step_s(batch) when batch > 0, else prefill_fixed_s
    kv_transfer_s(nbytes)  = transfer_latency_s + nbytes / transfer_bytes_per_s

``new`` prompt tokens are computed after ``cached`` ones came from the prefix cache; the
attention term charges each new token for the context before it (quadratic in the prompt).
A preset describes one *worker* (one engine instance, however many GPUs it spans). Presets are
named (``PRESETS``, ``CostModel.preset``; a sim worker's ``sim_preset``). The load-testing tools
reuse these figures to project cluster capacity, so every preset says where its numbers come from.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvrelay.schemas.errors import ValidationError
from kvrelay.schemas.struct import Struct, check_fields, limit, typed


class UnknownPreset(ValidationError):
    """No cost-model preset has this name."""

    def __init__(self, name: str) -> None:
        super().__init__("cost_preset", f"unknown preset {name!r}; known: {sorted(PRESETS)}")


@typed
class CostModel(Struct):
    name: str = limit("custom", max_len=64)
    # prefill: throughput of uncached prompt tokens, a fixed cost per forward, attention per token pair
    prefill_tokens_per_s: float = limit(min=1e-3, max=1e9)
    prefill_fixed_s: float = limit(0.0, min=0.0, max=60.0)
    prefill_attn_s: float = limit(0.0, min=0.0, max=1.0)
    # decode: one step gives every running sequence one token
    decode_fixed_s: float = limit(min=0.0, max=60.0)
    decode_per_seq_s: float = limit(0.0, min=0.0, max=60.0)
    # KV: bytes per token of the served model, and the transfer path between workers
    kv_bytes_per_token: int = limit(min=1, max=1 << 30)
    transfer_bytes_per_s: float = limit(min=1.0, max=1e15)
    transfer_latency_s: float = limit(0.0, min=0.0, max=60.0)
    # KV cache memory of one worker (what is left after the weights): sizes the block pool
    kv_cache_gb: float = limit(1.0, min=1e-6, max=1e6)

    def __post_init__(self) -> None:
        check_fields(self)

    def validate(self) -> None:
        if self.decode_fixed_s + self.decode_per_seq_s <= 0:
            raise ValidationError("decode_fixed_s", "a decode step must take some time")

    @classmethod
    def preset(cls, name: str) -> CostModel:
        try:
            return PRESETS[name]
        except KeyError:
            raise UnknownPreset(name) from None

    # --- the model -------------------------------------------------------------------------------
    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens < 0 or cached_tokens < 0:
            raise ValueError("token counts must be >= 0")
        if new_tokens == 0:
            return 0.0
        attn = self.prefill_attn_s * new_tokens * (cached_tokens + new_tokens / 2)
        return self.prefill_fixed_s + new_tokens / self.prefill_tokens_per_s + attn

    def decode_step_s(self, batch: int) -> float:
        if batch < 1:
            raise ValueError("a decode step needs a batch of at least 1")
        return self.decode_fixed_s + self.decode_per_seq_s * batch

    def forward_s(self, batch: int, chunks: Sequence[tuple[int, int]]) -> float:
        """One mixed forward (chunked prefill): ``batch`` sequences decode a token each while prompt
        chunks of ``(new, cached)`` tokens are computed. The weights are read once, so the fixed cost
        is paid once: the decode step's when anything decodes, else the prefill's."""
        if batch < 0 or any(n < 0 or cached < 0 for n, cached in chunks):
            raise ValueError("batch and token counts must be >= 0")
        new = sum(n for n, _ in chunks)
        if not batch and not new:
            return 0.0
        d = new / self.prefill_tokens_per_s
        d += sum(self.prefill_attn_s * n * (cached + n / 2) for n, cached in chunks)
        d += self.decode_fixed_s + self.decode_per_seq_s * batch if batch else self.prefill_fixed_s
        return d

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.kv_bytes_per_token

    def kv_transfer_s(self, nbytes: int) -> float:
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        return 0.0 if nbytes == 0 else self.transfer_latency_s + nbytes / self.transfer_bytes_per_s

    def kv_cache_tokens(self, kv_cache_gb: float | None = None) -> int:
        """Tokens of KV the worker's cache holds (``kv_cache_gb`` overrides the preset's)."""
        gb = self.kv_cache_gb if kv_cache_gb is None else kv_cache_gb
        return int(gb * (1 << 30)) // self.kv_bytes_per_token


# SmolLM2-135M (fp32) on this machine (2 cores), from DESIGN.md "Measured on this machine":
# prefill ~350 tok/s; decode ~13 tok/s at batch 1 and ~49 tok/s (aggregate) at batch 8, i.e. a
# step of 1/13 = 76.9 ms at batch 1 and 8/49 = 163.3 ms at batch 8: fixed 64.6 ms + 12.3 ms/seq.
# Attention: 4 * 30 layers * 576 hidden = 69 kFLOP per (token, context token) against
# 2 * 135 M = 270 MFLOP per token for the weights, so 2.56e-4 of a token's time per context token.
# KV: 30 layers * 3 kv heads * 64 head dim * 2 (K, V) * 4 bytes = 46,080 B/token. Transfer:
# a shared-memory copy (10-25 GB/s measured) plus ~0.4 ms for the release round trip on NATS.
CPU_SMOLLM2 = CostModel(
    name="cpu-smollm2", prefill_tokens_per_s=350.0, prefill_fixed_s=0.0,
    prefill_attn_s=(1 / 350.0) * 2.56e-4, decode_fixed_s=0.0646, decode_per_seq_s=0.0123,
    kv_bytes_per_token=46_080, transfer_bytes_per_s=10e9, transfer_latency_s=0.0004, kv_cache_gb=4.0,
)

# Llama-3.3-70B-Instruct, FP8, on 2 x H100 80GB (tensor parallel 2) = one worker. Published by
# NVIDIA: "NIM LLM Benchmarking - Performance" (docs.nvidia.com/nim/benchmarking/llm/, version
# 1.0.0 of the guide, NIM 1.8.0, TRT-LLM): 5000 input / 500 output tokens at concurrency 1:
# TTFT 406.77 ms, ITL 18.58 ms; at concurrency 25: ITL 38.75 ms; at 50: ITL 59.73 ms;
# 500 input / 2000 output at concurrency 1: TTFT 47.77 ms.
# Prefill from the two TTFTs: (5000 - 500) / (0.40677 - 0.04777) s = 12.5k tok/s, plus 7.9 ms fixed
# (the attention share is inside that straight line; no separate term).
# Decode from the ITLs: 17.7 ms + 0.84 ms per running sequence (fits 1, 25 and 50 within 0.1 ms).
# KV: 80 layers * 8 kv heads * 128 head dim * 2 (K, V) * 1 byte (FP8) = 163,840 B/token.
# Transfer (an assumption, not a measurement): RDMA at 400 Gb/s per GPU, ~40 GB/s effective for
# the pair, 0.5 ms setup. KV cache: 2 * 80 GB - ~70 GB of FP8 weights - activations ~ 70 GB.
H100_LLAMA70B = CostModel(
    name="h100-llama70b", prefill_tokens_per_s=12_535.0, prefill_fixed_s=0.0079, prefill_attn_s=0.0,
    decode_fixed_s=0.0177, decode_per_seq_s=0.00084, kv_bytes_per_token=163_840,
    transfer_bytes_per_s=40e9, transfer_latency_s=0.0005, kv_cache_gb=70.0,
)

PRESETS: dict[str, CostModel] = {m.name: m for m in (CPU_SMOLLM2, H100_LLAMA70B)}
