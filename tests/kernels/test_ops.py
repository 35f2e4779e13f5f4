"""The public wrappers: bad inputs get a precise KernelInputError and change nothing; dispatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvrelay import kernels
from kvrelay.kernels import KernelInputError, UnsupportedLayoutError, reference

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


def test_ops_convert_block_size_rejects_bad_inputs():
    blocks = torch.zeros(3, 2, 2, 32, 16)  # gpu_hnd / cpu_nhbc page [H, bs=32, 2D]
    with pytest.raises(KernelInputError, match="pages hold 32 tokens, but src_bs is 16"):
        kernels.convert_block_size(blocks, 16, 32, 70, fmt="gpu_hnd")
    with pytest.raises(KernelInputError, match="70 tokens fill 3 blocks of 32, got 2"):
        kernels.convert_block_size(blocks[:2], 32, 16, 70, fmt="gpu_hnd")
    with pytest.raises(KernelInputError, match="must be contiguous"):
        kernels.convert_block_size(blocks.transpose(0, 1), 32, 16, 70, fmt="gpu_hnd")
    with pytest.raises(KernelInputError, match="with a 3-D page"):
        kernels.convert_block_size(blocks[:, 0], 32, 16, 70, fmt="gpu_hnd")
    with pytest.raises(KernelInputError, match="even last dim"):
        kernels.convert_block_size(blocks[..., :15].contiguous(), 32, 16, 70, fmt="gpu_hnd")
    with pytest.raises(KernelInputError, match="src_bs: must be an int >= 1"):
        kernels.convert_block_size(blocks, 0, 16, 70, fmt="gpu_hnd")
    with pytest.raises(KernelInputError, match="num_tokens: must be an int >= 0"):
        kernels.convert_block_size(blocks, 32, 16, -1, fmt="gpu_hnd")
    with pytest.raises(KernelInputError, match="dst_bs: must be an int"):
        kernels.convert_block_size(blocks, 32, True, 70, fmt="gpu_hnd")
    with pytest.raises(UnsupportedLayoutError, match="unknown page format 'nhd'"):
        kernels.convert_block_size(blocks, 32, 16, 70, fmt="nhd")
    with pytest.raises(KernelInputError, match="quantized with their own order"):
        kernels.convert_block_size(blocks.to(torch.int8), 32, 16, 70, fmt="cpu_nhbc")
    with pytest.raises(KernelInputError, match=r"out: must have shape \[5, 2, 2, 16, 16\]"):
        kernels.convert_block_size(blocks, 32, 16, 70, fmt="gpu_hnd", out=torch.zeros(5, 2, 2, 32, 16))


def test_ops_convert_block_size_fills_out_without_allocating_a_result():
    blocks = torch.randn(3, 2, 2, 32, 16)
    out = torch.full((5, 2, 2, 16, 16), 7.0)
    assert kernels.convert_block_size(blocks, 32, 16, 70, fmt="cpu_nhbc", out=out) is out
    assert torch.equal(out, reference.convert_block_size(blocks, 32, 16, 70, fmt="cpu_nhbc"))


def test_ops_convert_block_size_of_no_tokens_gives_no_blocks():
    got = kernels.convert_block_size(torch.zeros(0, 2, 32, 3, 8), 32, 16, 0, fmt="gpu_nhd")
    assert got.shape == (0, 2, 16, 3, 8)


def test_ops_split_heads_for_tp_rejects_heads_that_do_not_shard():
    blocks = torch.zeros(2, 2, 3, 32, 16)  # 3 heads
    with pytest.raises(KernelInputError, match="3 KV heads cannot be sharded over tp=2") as err:
        kernels.split_heads_for_tp(blocks, 2, fmt="cpu_nhbc")
    assert err.value.arg == "tp"
    with pytest.raises(KernelInputError, match="tp: must be an int >= 1"):
        kernels.split_heads_for_tp(blocks, 0, fmt="cpu_nhbc")


def test_ops_split_then_merge_heads_round_trips_with_replication():
    blocks = torch.randn(2, 3, 32, 2, 16)  # gpu_nhd page [bs=32, H=2, 2D]
    parts = kernels.split_heads_for_tp(blocks, 4, fmt="gpu_nhd")  # 2 heads over 4 ranks: replicated
    assert [p.shape[3] for p in parts] == [1, 1, 1, 1]
    assert torch.equal(parts[0], parts[1]) and torch.equal(parts[2], parts[3])
    assert torch.equal(kernels.merge_heads_from_tp(parts, fmt="gpu_nhd", num_kv_heads=2), blocks)


def test_ops_split_heads_for_tp_fills_preallocated_parts():
    blocks = torch.randn(2, 3, 4, 32, 16)  # cpu page [H=4, bs=32, 2D]
    out = [torch.full((2, 3, 2, 32, 16), 5.0) for _ in range(2)]
    parts = kernels.split_heads_for_tp(blocks, 2, fmt="cpu_nhbc", out=out)
    assert all(p is o for p, o in zip(parts, out, strict=True))
    assert torch.equal(kernels.merge_heads_from_tp(parts, fmt="cpu_nhbc"), blocks)
    with pytest.raises(KernelInputError, match="out: must be a list of 2 tensors"):
        kernels.split_heads_for_tp(blocks, 2, fmt="cpu_nhbc", out=out[:1])
    with pytest.raises(KernelInputError, match=r"out\[1\]: must have shape \[2, 3, 2, 32, 16\]"):
        kernels.split_heads_for_tp(blocks, 2, fmt="cpu_nhbc", out=[out[0], blocks])


def test_ops_merge_heads_from_tp_rejects_mismatched_parts():
    part = torch.zeros(2, 3, 32, 2, 16)
    with pytest.raises(KernelInputError, match="non-empty list"):
        kernels.merge_heads_from_tp([], fmt="gpu_nhd")
    with pytest.raises(KernelInputError, match=r"parts\[1\]: shape"):
        kernels.merge_heads_from_tp([part, part[:1].contiguous()], fmt="gpu_nhd")
    with pytest.raises(KernelInputError, match=r"parts\[1\]: dtype"):
        kernels.merge_heads_from_tp([part, part.double()], fmt="gpu_nhd")
    with pytest.raises(KernelInputError, match="give 1 per rank, parts hold 2"):
        kernels.merge_heads_from_tp([part, part], fmt="gpu_nhd", num_kv_heads=2)
    with pytest.raises(KernelInputError, match="3 KV heads cannot be sharded over tp=2"):
        kernels.merge_heads_from_tp([part, part], fmt="gpu_nhd", num_kv_heads=3)


def test_ops_cpu_to_gpu_layout_refuses_packed_isas_and_bad_formats():
    blocks = torch.zeros(1, 1, 3, 32, 128, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedLayoutError, match="ISA 'amx'.*VNNI"):
        kernels.cpu_to_gpu_layout(blocks, isa="amx")
    with pytest.raises(UnsupportedLayoutError, match="'sse'"):
        kernels.gpu_to_cpu_layout(blocks, isa="sse", gpu_fmt="gpu_hnd")
    with pytest.raises(KernelInputError, match="gpu_fmt: must be one of"):
        kernels.cpu_to_gpu_layout(blocks, isa="vec", gpu_fmt="cpu_nhbc")
    with pytest.raises(KernelInputError, match="quantized with their own order"):
        kernels.gpu_to_cpu_layout(blocks.view(torch.int16), isa="vec")


def test_ops_cpu_to_gpu_layout_puts_each_token_k_then_v():
    # one head, 2 tokens, head_dim 2: cpu page per head is K as [D, bs] then V as [bs, D]
    cpu = torch.tensor([[10.0, 20.0, 11.0, 21.0], [100.0, 101.0, 200.0, 201.0]]).view(1, 1, 1, 2, 4)
    gpu = kernels.cpu_to_gpu_layout(cpu, isa="vec")  # gpu_nhd page [bs, H, 2D]
    assert gpu.flatten().tolist() == [10.0, 11.0, 100.0, 101.0, 20.0, 21.0, 200.0, 201.0]


def test_ops_errors_are_value_errors():
    assert issubclass(KernelInputError, ValueError) and issubclass(UnsupportedLayoutError, KernelInputError)


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
