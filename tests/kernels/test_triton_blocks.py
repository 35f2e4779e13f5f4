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
from kvrelay.kernels.layouts import PageSpec

FORMATS = ["gpu_nhd", "gpu_hnd", "cpu_nhbc"]


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


def page_of(fmt, heads, bs, dim):
    return PageSpec(fmt, heads, bs, dim).shape


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


def _conversion_cases():
    rng = random.Random(11)
    cases = [
        ("gpu_nhd", 3, 64, 16, 32, 1000),
        ("cpu_nhbc", 3, 64, 32, 16, 4097),
        ("gpu_hnd", 8, 128, 32, 48, 77),
        ("gpu_nhd", 1, 256, 16, 64, 1),
        ("cpu_nhbc", 32, 128, 64, 32, 300),
    ]
    for _ in range(12):
        cases.append(
            (
                rng.choice(FORMATS),
                rng.choice([1, 2, 3, 8]),
                rng.choice([32, 64, 80, 128]),
                rng.choice([1, 16, 32, 48]),
                rng.choice([5, 16, 32, 64]),
                rng.randint(1, 2000),
            )
        )
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt,heads,dim,src_bs,dst_bs,tokens", _conversion_cases())
def test_triton_convert_block_size_matches_reference_on_cuda(dtype, fmt, heads, dim, src_bs, dst_bs, tokens):
    blocks = rand((-(-tokens // src_bs), 3, *page_of(fmt, heads, src_bs, dim)), dtype, "cuda")
    got = kernels.convert_block_size(blocks, src_bs, dst_bs, tokens, fmt=fmt)
    want = reference.convert_block_size(blocks, src_bs, dst_bs, tokens, fmt=fmt)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("heads,tp", [(8, 2), (8, 8), (4, 1), (2, 4), (3, 6), (32, 4)])
def test_triton_tp_split_merge_match_reference_on_cuda(fmt, heads, tp):
    blocks = rand((40, 5, *page_of(fmt, heads, 32, 64)), torch.bfloat16, "cuda")
    got = kernels.split_heads_for_tp(blocks, tp, fmt=fmt)
    want = reference.split_heads_for_tp(blocks, tp, fmt=fmt)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    merged = kernels.merge_heads_from_tp(got, fmt=fmt, num_kv_heads=heads)
    assert torch.equal(merged, blocks)


@pytest.mark.gpu
@pytest.mark.parametrize("src_fmt", FORMATS)
@pytest.mark.parametrize("dst_fmt", FORMATS)
@pytest.mark.parametrize("heads,bs,dim", [(3, 32, 64), (8, 16, 128), (1, 64, 32), (5, 48, 80)])
def test_triton_convert_layout_matches_reference_on_cuda(src_fmt, dst_fmt, heads, bs, dim):
    blocks = rand((33, 4, *page_of(src_fmt, heads, bs, dim)), torch.float16, "cuda")
    got = kernels.convert_layout(blocks, src_fmt, dst_fmt)
    assert torch.equal(got, reference.convert_layout(blocks, src_fmt, dst_fmt))


@pytest.mark.gpu
def test_triton_cpu_to_gpu_round_trip_on_cuda():
    blocks = rand((128, 30, 3, 32, 128), torch.bfloat16, "cuda")  # SmolLM2, 4096 tokens
    there = kernels.cpu_to_gpu_layout(blocks, isa="vec", gpu_fmt="gpu_nhd")
    assert torch.equal(there, reference.cpu_to_gpu_layout(blocks, isa="vec", gpu_fmt="gpu_nhd"))
    assert torch.equal(kernels.gpu_to_cpu_layout(there, isa="vec", gpu_fmt="gpu_nhd"), blocks)


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


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "src_bs,dst_bs,tokens", [(16, 32, 45), (32, 16, 45), (8, 12, 30), (4, 4, 16), (5, 3, 1)]
)
def test_triton_interpreted_remap_converts_block_size_like_reference(
    interpreted_triton, fmt, src_bs, dst_bs, tokens
):
    src = PageSpec(fmt, 3, src_bs, 4)
    dst = src.with_(block_size=dst_bs)
    blocks = rand((-(-tokens // src_bs), 2, *src.shape), torch.bfloat16)
    want = reference.convert_block_size(blocks, src_bs, dst_bs, tokens, fmt=fmt)
    got = torch.full_like(want, 9)  # padding must be overwritten with zeros
    interpreted_triton.remap(blocks, src, got, dst, num_tokens=tokens)
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("heads,tp", [(4, 2), (2, 4), (6, 3)])
def test_triton_interpreted_remap_splits_and_merges_heads_like_reference(interpreted_triton, fmt, heads, tp):
    spec = PageSpec(fmt, heads, 4, 8)
    blocks = rand((2, 2, *spec.shape), torch.float32)
    merged = torch.zeros_like(blocks)
    want_parts = reference.split_heads_for_tp(blocks, tp, fmt=fmt)
    for part_want, (start, stop) in zip(want_parts, reference.tp_head_ranges(heads, tp), strict=True):
        part_spec = spec.with_(num_kv_heads=stop - start)
        part = torch.empty_like(part_want)
        interpreted_triton.remap(
            blocks, spec, part, part_spec, num_tokens=8, src_head0=start, num_heads=stop - start
        )
        assert torch.equal(part, part_want)
        interpreted_triton.remap(
            part, part_spec, merged, spec, num_tokens=8, dst_head0=start, num_heads=stop - start
        )
    assert torch.equal(merged, blocks)


@pytest.mark.parametrize("src_fmt", FORMATS)
@pytest.mark.parametrize("dst_fmt", FORMATS)
def test_triton_interpreted_remap_converts_layout_like_reference(interpreted_triton, src_fmt, dst_fmt):
    src = PageSpec(src_fmt, 3, 8, 16)
    blocks = rand((3, 2, *src.shape), torch.float16)
    want = reference.convert_layout(blocks, src_fmt, dst_fmt)
    got = torch.empty_like(want)
    interpreted_triton.remap(blocks, src, got, src.with_(fmt=dst_fmt), num_tokens=24)
    assert torch.equal(got, want)


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

    got = k.convert_block_size(buf, 8, 12, 20, fmt="cpu_nhbc")
    assert torch.equal(got, reference.convert_block_size(buf, 8, 12, 20, fmt="cpu_nhbc"))
    parts = k.split_heads_for_tp(buf, 2, fmt="cpu_nhbc")
    want = reference.split_heads_for_tp(buf, 2, fmt="cpu_nhbc")
    assert all(torch.equal(p, w) for p, w in zip(parts, want, strict=True))
    assert torch.equal(k.merge_heads_from_tp(parts, fmt="cpu_nhbc"), buf)
    replicated = k.split_heads_for_tp(buf, 4, fmt="cpu_nhbc")
    assert torch.equal(k.merge_heads_from_tp(replicated, fmt="cpu_nhbc", num_kv_heads=2), buf)
    nhd = k.cpu_to_gpu_layout(buf, isa="vec", gpu_fmt="gpu_nhd")
    assert torch.equal(nhd, reference.cpu_to_gpu_layout(buf, isa="vec", gpu_fmt="gpu_nhd"))
    assert torch.equal(k.gpu_to_cpu_layout(nhd, isa="vec", gpu_fmt="gpu_nhd"), buf)


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
    """Both kernels lower to PTX for an H100, and aligned copies use 16-byte vector accesses."""
    pytest.importorskip("triton", reason="triton is not installed")
    from kvrelay.kernels import triton_blocks as tb

    copy_sig = {"base_ptr": "*i16", "layer_offsets_ptr": "*i64", "layer_stride": "i64", "block_stride": "i32",
                "ids_ptr": "*i64", "buf_ptr": "*i16", "page_elems": "i32", "n_tiles": "i32"}  # fmt: skip
    aligned = ("base_ptr", "layer_stride", "block_stride", "buf_ptr", "page_elems")
    for uniform, scatter in ((True, False), (True, True), (False, False)):
        consts = {"UNIFORM": uniform, "ALIGN": 16, "SCATTER": scatter, "BLOCK": 4096}
        ptx = _compile_for_sm90(tb._copy_pages_kernel, copy_sig, consts, aligned)
        assert re.search(r"ld\.global[.\w]*\.v4", ptx) and re.search(r"st\.global[.\w]*\.v4", ptx)

    # gpu_nhd pages of SmolLM2 (3 heads x 64), block size 32 -> 16, as a launch specializes them:
    # the dim strides (1) become constants, the other sizes and strides are multiples of 16
    names = [n for n in tb._remap_kernel.arg_names if not n.startswith("BLOCK")]
    remap_sig = {n: "*i16" if n.endswith("_ptr") else "i64" if "stride" in n else "i32" for n in names}
    consts = {"BLOCK_T": 16, "BLOCK_H": 4, "BLOCK_D": 64, "sk_dim": 1, "sv_dim": 1, "dk_dim": 1, "dv_dim": 1}
    unaligned = ("num_tokens", "num_heads", "n_tok_tiles", "n_head_tiles")
    aligned = tuple(n for n in names if n not in consts and n not in unaligned)
    ptx = _compile_for_sm90(tb._remap_kernel, remap_sig, consts, aligned)
    assert re.search(r"ld\.global[.\w]*\.v\d", ptx) and re.search(r"st\.global[.\w]*\.v\d", ptx)
    generic = _compile_for_sm90(tb._remap_kernel, remap_sig, {"BLOCK_T": 32, "BLOCK_H": 4, "BLOCK_D": 128})
    assert ".entry _remap_kernel" in generic
