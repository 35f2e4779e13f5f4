"""Worker configuration: the engine, the prefill side, the decode side, and what a worker process reads."""

from __future__ import annotations

from typing import Literal

from kvrelay.schemas.errors import ValidationError
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.schemas.struct import Struct, limit, typed
from kvrelay.transport.config import BusConfig
from kvrelay.workers.cpus import parse_cpu_list


@typed
class EngineConfig(Struct):
    """What model runs and how. ``model`` is a folder (``kvrelay model prepare`` makes them)."""

    kind: Literal["vllm", "sim"] = "vllm"
    model: str = limit("", max_len=4096)
    served_model_name: str = limit("", max_len=256)
    max_model_len: int = limit(4096, min=16, max=1 << 20)
    max_num_seqs: int = limit(16, min=1, max=4096)
    kv_cache_gb: float = limit(1.0, min=0.05, max=4096.0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    enforce_eager: bool = True
    seed: int = limit(0, min=0)
    enable_prefix_caching: bool = True
    startup_timeout_s: float = limit(600.0, min=1.0)
    # CPU cores the engine's compute threads are bound to (vLLM CPU: VLLM_CPU_OMP_THREADS_BIND),
    # e.g. "0", "1-3"; "" leaves vLLM's automatic binding; "nobind" disables binding
    cpu_bind: str = limit("", max_len=256)
    # kind "sim" only (workers/sim): the cost-model preset (workers/sim/cost.py PRESETS), real
    # seconds per modelled second (0 = no waiting), and KV blocks (0 = as many as the preset's worker holds)
    sim_preset: str = limit("cpu-smollm2", max_len=64)
    sim_time_scale: float = limit(1.0, min=0.0, max=1e6)
    sim_num_blocks: int = limit(0, min=0, max=1 << 24)


@typed
class PrefillConfig(Struct):
    worker_id: str = limit("", max_len=64)  # "" = generated from host and pid
    # tasks accepted but not started; past either bound the worker rejects (router tries another)
    max_queued: int = limit(64, min=1)
    max_queued_tokens: int = limit(262_144, min=1)
    # requests in the engine at once
    max_running: int = limit(8, min=1)
    # vLLM engines: prompt tokens the engine computes per step (its max_num_batched_tokens, chunked
    # prefill on); 0 = vLLM's default (2048 on CPU)
    chunk_tokens: int = limit(0, min=0, max=1 << 20)
    # vLLM engines: while other prompts wait, one prompt computes at most this many tokens a step
    # (vLLM long_prefill_token_threshold), so a short prompt arriving behind a long one starts at the
    # next step instead of after the whole long prefill; 0 = no cap (first come, first served)
    long_prompt_step_tokens: int = limit(0, min=0, max=1 << 20)
    # the order queued tasks start in (workers/prefill_queue.py): "shortest" = least uncached prompt
    # first, so short prompts pass long ones waiting; a task's key shrinks by aging_tokens_per_s for each
    # second it waits, and one passed over max_overtakes times goes before any younger task. "fifo":
    # arrival order. (Tasks queue only while max_running run; inside vLLM, long_prompt_step_tokens)
    schedule: Literal["shortest", "fifo"] = "shortest"
    aging_tokens_per_s: float = limit(1000.0, min=0.0, max=1e9)
    max_overtakes: int = limit(16, min=0, max=1 << 20)
    # the export region holding finished prefills' KV until a decode worker fetches it
    export_mb: int = limit(512, min=1)
    lease_s: float = limit(30.0, min=0.5, max=3600.0)
    export_timeout_s: float = limit(30.0, min=0.1)
    backends: list[str] = limit(["shm", "tcp"], max_len=4)
    tcp_host: str = limit("127.0.0.1", max_len=256)
    tcp_port: int = limit(0, min=0, max=65535)
    checksum: bool = False
    # how often held exports are checked for expired leases
    lease_check_s: float = limit(1.0, min=0.01, max=60.0)
    # on stop: how long queued and running tasks (and unreleased leases) may take to finish
    drain_timeout_s: float = limit(10.0, min=0.0, max=3600.0)
    # Prometheus /metrics HTTP port (0 = off)
    metrics_port: int = limit(0, min=0, max=65535)

    def validate(self) -> None:
        for b in self.backends:
            if b not in ("shm", "tcp", "cuda-ipc", "nixl"):
                raise ValidationError("prefill.backends", f"unknown backend {b!r}")


@typed
class DecodeConfig(Struct):
    worker_id: str = limit("", max_len=64)
    # requests decoding at once; the worker pulls from the work queue only while below it
    max_slots: int = limit(8, min=1, max=4096)
    fetch_batch: int = limit(4, min=1, max=256)
    fetch_timeout_s: float = limit(1.0, min=0.05, max=30.0)
    # how long a pulled PrefillDone may stay un-acked before JetStream redelivers it
    ack_wait_s: float = limit(60.0, min=1.0, max=3600.0)
    max_deliver: int = limit(3, min=1, max=100)
    transfer_timeout_s: float = limit(30.0, min=0.1, max=600.0)
    backends: list[str] = limit(["shm", "tcp"], max_len=4)
    # cores the KV loader threads run on ("0", "0-1", "0,2"); "" = wherever the engine runs. On CPU
    # machines, a core other than the engine's keeps big imports from stretching decode steps
    kv_load_cpus: str = limit("", max_len=256)
    # vLLM engines: prompt tokens the decode engine computes per step (its max_num_batched_tokens,
    # chunked prefill on); 0 = vLLM's default (2048 on CPU). A local prefill (a session's next step)
    # is then spread over steps, bounding how long it stalls the streams decoding beside it
    prefill_chunk_tokens: int = limit(0, min=0, max=1 << 20)
    # local prefills within a decode ITL budget (workers/local_budget.py): one is admitted only while
    # the prompt tokens local prefills still have to compute fit what keeps decode steps within
    # local_itl_target_ms, estimated from a step's time (local_step_ms) and a prompt token's
    # (local_token_ms): (target - step) / token tokens a step, times local_budget_steps steps when the
    # engine chunks prefill (it does at that size when prefill_chunk_tokens is 0); else refused
    # ("overloaded": the router takes the prefill path). 0 = no budget (slots only)
    local_itl_target_ms: float = limit(0.0, min=0.0, max=600_000.0)
    local_step_ms: float = limit(50.0, min=0.0, max=600_000.0)
    local_token_ms: float = limit(0.7, min=0.0, max=60_000.0)
    local_budget_steps: int = limit(8, min=1, max=1 << 16)
    # debug: zero the KV after loading it (proves the KV is really transferred)
    debug_zero_kv: bool = False
    # un-acked PrefillDone messages the shared consumer allows across all decode workers
    max_ack_pending: int = limit(1024, min=1, max=1 << 20)
    # on stop: how long running requests may take to finish before they are aborted
    drain_timeout_s: float = limit(10.0, min=0.0, max=3600.0)
    # Prometheus /metrics HTTP port (0 = off)
    metrics_port: int = limit(0, min=0, max=65535)
    # session KV kept across tool pauses (workers/vllm_engine/pins.py): a step that asks (kv_ttl_s)
    # keeps its blocks allocated after it finishes: pins hold at most this share of the engine's KV
    # blocks and kv_pin_max_sessions sessions (the oldest pins are evicted past either), each at most
    # kv_pin_max_ttl_s; 0 = never pin
    kv_pin_budget: float = limit(0.5, min=0.0, max=0.9)
    kv_pin_max_sessions: int = limit(256, min=0, max=1 << 20)
    kv_pin_max_ttl_s: float = limit(300.0, min=0.0, max=86400.0)

    def validate(self) -> None:
        parse_cpu_list(self.kv_load_cpus, "decode.kv_load_cpus")


@typed
class WorkerProcessConfig(Struct):
    """Everything a worker process reads: the bus, the deployment's cache contract, its engine and
    both roles' sections (a process serves one of them). The root config composes this; a worker
    never sees the router's section."""

    bus: BusConfig = BusConfig()
    cache: CacheConfig = CacheConfig()
    engine: EngineConfig = EngineConfig()
    prefill: PrefillConfig = PrefillConfig()
    decode: DecodeConfig = DecodeConfig()

