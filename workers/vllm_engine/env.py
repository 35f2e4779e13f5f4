"""Environment variables kvrelay sets for vLLM, in one place (vLLM reads them; kvrelay does not).

They are set in this process before the engine starts, so vLLM's EngineCore child process
(spawned) inherits them:

- ``HF_HUB_OFFLINE=1``: models are local folders; never reach for the hub.
- ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the model runs inside the EngineCore child (one child
  process, not two: faster on few cores).
- ``VLLM_WORKER_MULTIPROC_METHOD=spawn``: forking a process that holds threads and an event loop
  is unsafe.
- ``VLLM_NO_USAGE_STATS=1``, ``DO_NOT_TRACK=1``: no usage reporting from serving machines.
- ``TOKENIZERS_PARALLELISM=false``: the tokenizers thread pool fights the engine for cores.
- ``VLLM_CPU_OMP_THREADS_BIND``: ``EngineConfig.cpu_bind`` when set (cores for the engine's
  compute threads; ``nobind`` disables binding); otherwise vLLM binds automatically.
- ``VLLM_CPU_KVCACHE_SPACE``: removed; this legacy variable would override
  ``EngineConfig.kv_cache_gb`` (passed to vLLM as ``kv_cache_memory_bytes``).

Values already set by the operator win, except ``VLLM_CPU_KVCACHE_SPACE`` (removed) and
``VLLM_CPU_OMP_THREADS_BIND`` when ``cpu_bind`` is configured. The variables are process-wide:
engines in one process that need different bindings must be started one after the other.
"""

from __future__ import annotations

import os

VLLM_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
REMOVED = ("VLLM_CPU_KVCACHE_SPACE",)


def apply(cpu_bind: str = "") -> None:
    """Set the variables above in ``os.environ`` (call before importing or starting vLLM)."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    for key in REMOVED:
        os.environ.pop(key, None)
    if cpu_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind


def resolve_dtype(dtype: str) -> str:
    """``engine.dtype``, with "auto" made concrete for CPUs without native bfloat16 math.

    vLLM's "auto" serves float32 checkpoints as bfloat16 on CPU, but without AVX512-BF16 or AMX
    (e.g. AVX2 machines) bfloat16 falls back to slow paths: float32 prefills ~3.6x faster there
    for SmolLM2. With them bfloat16 is the fast one (a Xeon with AMX: SmolLM2 decode steps 1.8x,
    prefill 3.3x faster than float32). GPUs and bf16-capable CPUs keep vLLM's own choice.
    """
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return dtype
    return dtype if cpu_has_bf16_math() else "float32"


def cpu_has_bf16_math() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX).

    ``torch.backends.cpu.get_cpu_capability()`` names only the vector width ATen's kernels were
    built for ("AVX512" on AMX machines too), so the instruction sets are asked for directly.
    """
    import torch

    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    probes = [getattr(torch.cpu, name, None) for name in names]
    if any(p is not None for p in probes):
        return any(bool(p()) for p in probes if p is not None)
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "AVX512_BF16", "AMX"...
    return "BF16" in capability or "AMX" in capability
