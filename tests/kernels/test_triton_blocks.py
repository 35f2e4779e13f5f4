"""The Triton kernels against the torch reference.

Two runs of the same comparisons:
- ``gpu`` tests: ``kvrelay.kernels`` ops on CUDA tensors (which dispatch to Triton) against
  ``reference`` on the same tensors, on many shapes and dtypes; skipped cleanly without a GPU.
- interpreter tests: the kernels in Triton's CPU interpreter (small shapes; it is slow), so the
  index arithmetic is checked on machines without a GPU too; skipped when triton is missing.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from kvrelay import kernels
from kvrelay.kernels import reference


def rand(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).mul(40)
    return x.to(dtype).to(device)


def make_layers(kind: str, num_layers: int, num_blocks: int, page, dtype, device):
    """Per-layer caches laid out the ways callers hand them over."""
    alloc = rand((num_layers, num_blocks, *page), dtype, device, seed=num_blocks)
    if kind == "stacked":  # one [L, NB, *page] tensor
        return alloc
    if kind == "views":  # vLLM: views of one allocation, evenly spaced
        return list(alloc.unbind(0))
    if kind == "reversed":  # evenly spaced, negative step
        return list(alloc.unbind(0))[::-1]
    if kind == "shuffled":  # one allocation, uneven order: the offset-table path
        layers = list(alloc.unbind(0))
        random.Random(num_layers).shuffle(layers)
        return layers
    if kind == "separate":  # one allocation per layer
        return [t.clone() for t in alloc.unbind(0)]
    if kind == "strided":  # blocks spaced wider than a page (vLLM's padded pages)
        wide = rand((num_layers, num_blocks, 2, *page), dtype, device, seed=1)
        return [t[:, 1] for t in wide.unbind(0)]
    raise AssertionError(kind)


# --- gpu: ops on CUDA (Triton) vs the reference on CUDA ----------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.int8, torch.int64]
GPU_GATHER_SHAPES = [
    (30, 600, (3, 32, 128), 512),
    (1, 5, (1, 1, 6), 5),
    (4, 300, (8, 16, 256), 77),
    (3, 50, (5, 7, 9), 31),
    (2, 2048, (2, 16, 80), 1000),
    (7, 9, (4,), 0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("kind", ["stacked", "views", "reversed", "shuffled", "separate", "strided"])
@pytest.mark.parametrize("num_layers,num_blocks,page,n", GPU_GATHER_SHAPES)
def test_triton_gather_scatter_match_reference_on_cuda(dtype, kind, num_layers, num_blocks, page, n):
    layers = make_layers(kind, num_layers, num_blocks, page, dtype, "cuda")
    assert kernels.backend_for(layers[0]) == "triton"
    ids = torch.randperm(num_blocks, device="cuda")[:n]
    got = kernels.gather_blocks(layers, ids)
    want = reference.gather_blocks(layers, ids)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))

    buf = rand(want.shape, dtype, "cuda", seed=5)
    mine = [t.clone() for t in layers]
    theirs = [t.clone() for t in layers]
    kernels.scatter_blocks(buf, mine, ids)
    reference.scatter_blocks(buf, theirs, ids)
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.gpu
def test_triton_gather_addresses_past_2_31_elements_on_cuda():
    page = (2, 32, 128)  # 8192 elements
    num_blocks = (1 << 31) // 8192 + 64  # > 2^31 elements in one layer (~4.3 GB of bf16)
    if torch.cuda.mem_get_info()[0] < 6 * (1 << 30):
        pytest.skip("needs 6 GiB of free GPU memory for a > 2^31-element cache")
    cache = torch.empty((num_blocks, *page), dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor([num_blocks - 1, 3, num_blocks - 40], device="cuda")
    cache[ids] = rand((3, *page), torch.bfloat16, "cuda")
    got = kernels.gather_blocks([cache], ids)
    assert torch.equal(got[:, 0], cache[ids])
    kernels.scatter_blocks(got.flip(0), [cache], ids)
    assert torch.equal(cache[ids], got[:, 0].flip(0))


# --- Triton's CPU interpreter vs the reference ------------------------------------------------


@pytest.mark.parametrize("kind", ["stacked", "views", "reversed", "shuffled", "separate", "strided"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_triton_interpreted_gather_scatter_match_reference(interpreted_triton, kind, dtype):
    layers = make_layers(kind, 3, 9, (2, 5, 6), dtype, "cpu")
    caches = reference.layer_list(layers)
    ids = torch.tensor([4, 0, 8, 2])
    out = torch.empty((4, 3, 2, 5, 6), dtype=dtype)
    interpreted_triton.gather_blocks(caches, ids, out)
    assert torch.equal(out, reference.gather_blocks(layers, ids))
    mine, theirs = [t.clone() for t in caches], [t.clone() for t in caches]
    buf = rand(out.shape, dtype, seed=3)
    interpreted_triton.scatter_blocks(buf, mine, ids)
    reference.scatter_blocks(buf, theirs, ids)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


@pytest.fixture
def ops_on_interpreter(interpreted_triton, monkeypatch):
    """``kvrelay.kernels`` ops with their Triton branch taken for CPU tensors, on the interpreter."""
    from kvrelay.kernels import ops

    monkeypatch.setattr(ops, "_triton_for", lambda t: interpreted_triton)
    return kernels


def test_triton_interpreted_ops_branches_match_reference(ops_on_interpreter):
    k = ops_on_interpreter
    alloc = rand((4, 12, 2, 8, 16), torch.bfloat16)  # L=4, NB=12, cpu page [H=2, bs=8, 2*8]
    ids = torch.tensor([11, 0, 5])
    buf = k.gather_blocks(list(alloc.unbind(0)), ids)
    assert torch.equal(buf, reference.gather_blocks(alloc, ids))
    target = torch.zeros_like(alloc)
    k.scatter_blocks(buf, target, ids)
    assert torch.equal(target[:, ids], alloc[:, ids])


# --- ahead-of-time compilation for an H100 (no GPU needed) -----------------------------------


def _compile_for_sm90(kernel, signature: dict, constexprs: dict, aligned: tuple = ()):
    """Compile ``kernel`` to PTX for sm_90 as a launch with these argument types would."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = backend.parse_options({"num_warps": 4})
    return triton.compile(source, target=target, options=options.__dict__).asm["ptx"]


def test_triton_kernels_compile_for_sm90_with_vector_copies():
    """The page copy lowers to PTX for an H100, and aligned copies use 16-byte vector accesses."""
    pytest.importorskip("triton", reason="triton is not installed")
    from kvrelay.kernels import triton_blocks as tb

    copy_sig = {"base_ptr": "*i16", "layer_offsets_ptr": "*i64", "layer_stride": "i64", "block_stride": "i32",
                "ids_ptr": "*i64", "buf_ptr": "*i16", "page_elems": "i32", "n_tiles": "i32"}  # fmt: skip
    aligned = ("base_ptr", "layer_stride", "block_stride", "buf_ptr", "page_elems")
    for uniform, scatter in ((True, False), (True, True), (False, False)):
        consts = {"UNIFORM": uniform, "ALIGN": 16, "SCATTER": scatter, "BLOCK": 4096}
        ptx = _compile_for_sm90(tb._copy_pages_kernel, copy_sig, consts, aligned)
        assert re.search(r"ld\.global[.\w]*\.v4", ptx) and re.search(r"st\.global[.\w]*\.v4", ptx)
