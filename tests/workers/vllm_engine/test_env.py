"""The engine dtype: explicit choices pass through; "auto" becomes float32 on CPUs without bf16 math."""

from __future__ import annotations

import pytest
import torch

from kvrelay.workers.vllm_engine.env import cpu_has_bf16_math, resolve_dtype


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_resolve_dtype_keeps_explicit_choices(dtype: str) -> None:
    assert resolve_dtype(dtype) == dtype


def _cpu(monkeypatch: pytest.MonkeyPatch, bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def test_resolve_dtype_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _cpu(monkeypatch, bf16=False, amx=False)
    assert resolve_dtype("auto") == "float32"
    _cpu(monkeypatch, bf16=True, amx=False)
    assert resolve_dtype("auto") == "auto"
    _cpu(monkeypatch, bf16=False, amx=True)
    assert resolve_dtype("auto") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _cpu(monkeypatch, bf16=False, amx=False)
    assert resolve_dtype("auto") == "auto"


def test_resolve_dtype_auto_sees_bf16_on_amx_cpus_whose_capability_says_avx512(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports "AVX512" on AMX machines: the instruction sets decide, not that string."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    _cpu(monkeypatch, bf16=True, amx=True)
    assert cpu_has_bf16_math()
    assert resolve_dtype("auto") == "auto"


def test_cpu_has_bf16_math_falls_back_to_the_capability_string(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not cpu_has_bf16_math()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_BF16")
    assert cpu_has_bf16_math()
