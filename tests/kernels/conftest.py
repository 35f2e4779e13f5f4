"""Kernel test plumbing: skip `gpu` tests cleanly without CUDA or triton; Triton's CPU interpreter."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU: torch.cuda.is_available() is False"
    if importlib.util.find_spec("triton") is None:
        return "needs triton, which is not installed"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        reason = _gpu_skip_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def interpreted_triton() -> ModuleType:
    """A private copy of ``triton_blocks`` whose kernels run in Triton's CPU interpreter.

    Triton picks the interpreter when ``@triton.jit`` runs (TRITON_INTERPRET=1 at decoration), so
    the module is executed afresh under another name; the real one is left compiled for CUDA.
    The launchers then take CPU tensors, which checks the kernels' index arithmetic without a GPU.
    """
    pytest.importorskip("triton", reason="triton is not installed")
    import kvrelay.kernels

    path = Path(kvrelay.kernels.__file__).with_name("triton_blocks.py")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.spec_from_file_location("kvrelay_kernels_triton_blocks_interpreted", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module
