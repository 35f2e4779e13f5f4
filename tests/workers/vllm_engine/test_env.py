"""The engine dtype: explicit choices pass through; "auto" becomes float32 on CPUs without bf16 math."""

from __future__ import annotations

import pytest
import torch

from kvrelay.workers.vllm_engine.env import resolve_dtype


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_resolve_dtype_keeps_explicit_choices(dtype: str) -> None:
    assert resolve_dtype(dtype) == dtype


def test_resolve_dtype_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert resolve_dtype("auto") == "float32"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_BF16")
    assert resolve_dtype("auto") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert resolve_dtype("auto") == "auto"
