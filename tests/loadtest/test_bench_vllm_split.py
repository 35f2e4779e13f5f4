"""``bench_kv_transfer`` and ``bench transfer --ttft``: the whole run on stand-in engines.

The stand-ins offer only what the benches may use of the vLLM engines: the ``workers.engine``
Protocols (``info``, ``start``/``stop``, ``prefill``, ``release``, ``stream``) and the public
``counters``. A bench that reaches for anything else, or for a setting the engine configuration
no longer has, fails here without vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvrelay.loadtest import bench_kv_transfer, bench_ttft
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.schemas.messages import KVDescriptor, KVLayout, PrefillDone, PrefillTask
from kvrelay.transport.kv.region import block_nbytes
from kvrelay.workers.config import DecodeConfig, EngineConfig, PrefillConfig
from kvrelay.workers.engine import EngineInfo, PrefillOutput, TokenDelta

BLOCK = CacheConfig().block_size
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=BLOCK, dtype="float32",
                  page_elems=BLOCK * 2 * 4)


def _info(engine: EngineConfig, layout: KVLayout | None) -> EngineInfo:
    return EngineInfo(model=engine.model, block_size=BLOCK, hash_seed="", layout=layout, backends=("shm",),
                      max_model_len=engine.max_model_len)


class StandInPrefill:
    def __init__(self, engine: EngineConfig, prefill: PrefillConfig) -> None:
        self.info, self.worker_id = _info(engine, None), "p0"
        self.counters = {"export_copy_ms": 0.0}
        self.held: set[int] = set()

    async def start(self) -> None:
        self.info = dataclasses.replace(self.info, layout=LAYOUT)

    async def stop(self) -> None:
        assert not self.held, "a bench left exports unreleased"

    async def prefill(self, task: PrefillTask) -> PrefillOutput:
        ticket = len(self.held) + 1
        self.held.add(ticket)
        self.counters["export_copy_ms"] += 1.5
        n = len(task.prompt_token_ids)
        kv = KVDescriptor(backend="shm", worker_id=self.worker_id, host="here", region="r",
                          block_ids=list(range(-(-n // BLOCK))), num_tokens=n, ticket=ticket,
                          lease_expires_ms=1, layout=LAYOUT)
        return PrefillOutput(first_token_id=1, text="", finish_reason=None, kv=kv, prefill_ms=10.0)

    def release(self, ticket: int) -> bool:
        held = ticket in self.held
        self.held.discard(ticket)
        return held


class StandInDecode:
    def __init__(self, engine: EngineConfig, decode: DecodeConfig) -> None:
        self.info = _info(engine, None)
        self.counters = {"import_ms": 0.0, "imports": 0}

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def stream(self, done: PrefillDone) -> AsyncIterator[TokenDelta]:
        assert done.kv is not None
        loaded = done.kv.host != "-"
        if loaded:
            self.counters["imports"] += 1
            self.counters["import_ms"] += 2.0
        n = len(done.prompt_token_ids)
        yield TokenDelta([2], "", kv_loaded_tokens=n if loaded else 0, kv_recomputed=not loaded)
        for i in range(done.sampling.max_tokens - 2):
            yield TokenDelta([3 + i], "")


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in (bench_kv_transfer, bench_ttft):
        monkeypatch.setattr(mod, "VllmPrefillEngine", StandInPrefill)
        monkeypatch.setattr(mod, "VllmDecodeEngine", StandInDecode)
        monkeypatch.setattr(mod.models, "resolve", lambda name: f"/models/{name}")


async def test_bench_kv_transfer_runs_on_the_engines_public_surface(stand_ins: None) -> None:
    args = argparse.Namespace(model="tiny", dtype="auto", tokens=[100], repeats=2, kv_cache_gb=0.5)
    report = await bench_kv_transfer.run(args)
    (row,) = report["results"]
    assert row["tokens"] == 100 and row["kv_bytes"] == 4 * block_nbytes(LAYOUT)
    assert row["export_copy_ms"] == 1.5 and row["import_copy_ms"] == 2.0 and row["prefill_ms"] == 10.0
    assert report["layout"] == LAYOUT.to_mapping()


async def test_bench_ttft_runs_on_the_engines_public_surface(stand_ins: None) -> None:
    args = argparse.Namespace(model="tiny", dtype="float32", tokens=[100], backend=["shm", "tcp"], repeats=2,
                              kv_cache_gb=1.0)
    report: dict[str, Any] = await bench_ttft.run(args)
    assert [(r["backend"], r["tokens"]) for r in report["results"]] == [("shm", 100), ("tcp", 100)]
    shm, tcp = report["results"]
    assert shm["kv_bytes"] == 4 * block_nbytes(LAYOUT) and shm["transfer_ms"] == 2.0
    assert "local_prefill_ms" in shm and "local_prefill_ms" not in tcp
    assert shm["export_copy_ms"] == 1.5 and shm["prefill_compute_ms"] == 10.0
