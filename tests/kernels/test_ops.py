"""The public wrappers: bad inputs get a precise KernelInputError and change nothing; dispatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvrelay import kernels
from kvrelay.kernels import KernelInputError, reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def caches():
    alloc = torch.randn(3, 10, 2, 32, 16).to(torch.bfloat16)  # L=3, NB=10, cpu page [H=2, bs=32, 2*8]
    return list(alloc.unbind(0))


IDS = torch.tensor([3, 9, 0])


def test_ops_gather_blocks_on_cpu_runs_the_reference_and_fills_out(caches):
    assert kernels.backend_for(caches[0]) == "torch"
    out = torch.empty(3, 3, 2, 32, 16, dtype=torch.bfloat16)
    assert kernels.gather_blocks(caches, IDS, out=out) is out
    assert torch.equal(out, reference.gather_blocks(caches, IDS))


def test_ops_scatter_blocks_writes_only_the_named_blocks(caches):
    before = [c.clone() for c in caches]
    buf = torch.zeros(3, 3, 2, 32, 16, dtype=torch.bfloat16)
    kernels.scatter_blocks(buf, caches, IDS)
    for c, b in zip(caches, before, strict=True):
        assert not c[IDS].any()
        keep = [i for i in range(10) if i not in IDS.tolist()]
        assert torch.equal(c[keep], b[keep])


@pytest.mark.parametrize(
    "ids,match",
    [
        pytest.param(torch.tensor([1, 2], dtype=torch.int32), "must be torch.int64", id="int32"),
        pytest.param(torch.tensor([[1, 2]]), "must be 1-D", id="2d"),
        pytest.param(torch.tensor([1, 10]), "id 10 is out of range", id="too-big"),
        pytest.param(torch.tensor([-1, 2]), "id -1 is out of range", id="negative"),
        pytest.param(torch.tensor([1, 2, 3, 4])[::2], "must be contiguous", id="strided"),
        pytest.param([1, 2], "expected a torch.Tensor", id="list"),
        pytest.param(torch.empty(2, dtype=torch.int64, device="meta"), "is on meta", id="device"),
    ],
)
def test_ops_gather_blocks_rejects_bad_block_ids(caches, ids, match):
    with pytest.raises(KernelInputError, match=match) as err:
        kernels.gather_blocks(caches, ids)
    assert err.value.arg == "block_ids"


def test_ops_scatter_blocks_rejects_duplicate_ids_and_leaves_caches_alone(caches):
    before = [c.clone() for c in caches]
    buf = torch.zeros(3, 3, 2, 32, 16, dtype=torch.bfloat16)
    with pytest.raises(KernelInputError, match="duplicates"):
        kernels.scatter_blocks(buf, caches, torch.tensor([4, 1, 4]))
    with pytest.raises(KernelInputError, match="out of range"):
        kernels.scatter_blocks(buf, caches, torch.tensor([4, 1, 10]))
    assert all(torch.equal(c, b) for c, b in zip(caches, before, strict=True))


def test_ops_gather_blocks_rejects_bad_layers(caches):
    with pytest.raises(KernelInputError, match="is empty"):
        kernels.gather_blocks([], IDS)
    with pytest.raises(KernelInputError, match=r"layers\[1\]: shape"):
        kernels.gather_blocks([caches[0], caches[1][:, :1]], IDS)
    with pytest.raises(KernelInputError, match=r"layers\[2\]: dtype torch.float32 differs"):
        kernels.gather_blocks([caches[0], caches[1], caches[2].float()], IDS)
    with pytest.raises(KernelInputError, match="pages must be contiguous"):
        kernels.gather_blocks([c.transpose(1, 2) for c in caches], IDS)  # LBNHC-style logical view
    overlapping = caches[0].flatten()[: 2 * 32 * 16 + 9].as_strided((10, 2, 32, 16), (1, 512, 16, 1))
    with pytest.raises(KernelInputError, match="blocks overlap"):
        kernels.gather_blocks([overlapping], IDS)
    with pytest.raises(KernelInputError, match="expected a list of tensors"):
        kernels.gather_blocks("layers", IDS)
    with pytest.raises(KernelInputError, match="1/2/4/8-byte"):
        kernels.gather_blocks([torch.zeros(4, 2, dtype=torch.complex128)], torch.tensor([0]))


def test_ops_gather_blocks_rejects_bad_out(caches):
    with pytest.raises(KernelInputError, match=r"out: must have shape \[3, 3, 2, 32, 16\]"):
        kernels.gather_blocks(caches, IDS, out=torch.empty(3, 3, 2, 32, 8, dtype=torch.bfloat16))
    with pytest.raises(KernelInputError, match="out: dtype torch.float16 differs"):
        kernels.gather_blocks(caches, IDS, out=torch.empty(3, 3, 2, 32, 16, dtype=torch.float16))
    with pytest.raises(KernelInputError, match="out: must be contiguous"):
        kernels.gather_blocks(
            caches, IDS, out=torch.empty(3, 3, 2, 16, 32, dtype=torch.bfloat16).transpose(3, 4)
        )


def test_ops_scatter_blocks_rejects_buf_of_wrong_shape(caches):
    with pytest.raises(KernelInputError, match=r"buf: must have shape \[3, 3, 2, 32, 16\]"):
        kernels.scatter_blocks(torch.zeros(3, 2, 2, 32, 16, dtype=torch.bfloat16), caches, IDS)


def test_ops_errors_are_value_errors():
    assert issubclass(KernelInputError, ValueError)


def test_kernels_bare_import_name_is_inert_and_explains_itself():
    """Under the bare name `kernels` nothing runs; transformers' probe reads it as unavailable."""
    code = (
        "import importlib.util\n"
        "print('FOUND', importlib.util.find_spec('kernels').origin)\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert is_kernels_available() is False\n"
        "try:\n"
        "    from kernels import gather_blocks\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"FOUND {ROOT / 'kernels' / '__init__.py'}" in done.stdout  # the probe did reach this folder
    assert "must be imported as `kvrelay.kernels`" in done.stdout
