"""The torch reference kernels against slow, obviously correct loops, on many random shapes."""

from __future__ import annotations

import random

import pytest
import torch

from kvrelay.kernels import reference

FORMATS = ["gpu_nhd", "gpu_hnd", "cpu_nhbc"]
DTYPES = [torch.bfloat16, torch.float32, torch.float16]


# --- the oracle: where element (kv, token t, head h, dim d) sits in a page, stated from vLLM's source


def page_offset(fmt: str, heads: int, bs: int, dim: int, kv: int, t: int, h: int, d: int) -> int:
    if fmt == "gpu_nhd":  # [bs, H, 2D]; channel [:D] is K, [D:] is V (flash_attn.py split)
        return ((t * heads + h) * 2 + kv) * dim + d
    if fmt == "gpu_hnd":  # [H, bs, 2D]
        return ((h * bs + t) * 2 + kv) * dim + d
    head = h * 2 * bs * dim  # cpu: per head, K as [D, bs] (column-major), then V as [bs, D]
    return head + (d * bs + t if kv == 0 else bs * dim + t * dim + d)


def page_shape(fmt: str, heads: int, bs: int, dim: int) -> tuple[int, int, int]:
    return (bs, heads, 2 * dim) if fmt == "gpu_nhd" else (heads, bs, 2 * dim)


def slow_move(src, dst, moves) -> None:
    """dst[...] = src[...] element by element for (src_block, dst_block, layer, src_off, dst_off) moves."""
    s, d = src.reshape(src.shape[0], src.shape[1], -1), dst.view(dst.shape[0], dst.shape[1], -1)
    for sb, db, layer, so, do in moves:
        d[db, layer, do] = s[sb, layer, so]


def rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


# --- gather / scatter -------------------------------------------------------------------------

GATHER_CASES = [
    (1, 1, (4,), 1),
    (3, 7, (2, 32, 16), 5),
    (5, 12, (16, 3, 10), 12),
    (2, 300, (3, 32, 128), 40),
    (4, 9, (1, 1, 2), 0),
    (30, 18, (3, 32, 64), 17),
]


def layouts_of(kind: str, alloc: torch.Tensor):
    """Per-layer caches over ``alloc`` [L, NB, *page] the ways callers hand them over."""
    if kind == "stacked":  # one [L, NB, *page] tensor
        return alloc
    if kind == "views":  # vLLM: evenly spaced views of one allocation
        return list(alloc.unbind(0))
    if kind == "interleaved":  # one allocation, block-major (vLLM's BLHNC): layers a page apart
        return list(alloc.transpose(0, 1).contiguous().transpose(0, 1).unbind(0))
    if kind == "reversed":  # views in descending memory order
        return list(alloc.unbind(0))[::-1]
    return [t.clone() for t in alloc.unbind(0)]  # "separate": one allocation per layer


KINDS = ["stacked", "views", "interleaved", "reversed", "separate"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("num_layers,num_blocks,page,n", GATHER_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_gather_blocks_matches_loop(dtype, num_layers, num_blocks, page, n, kind):
    alloc = rand((num_layers, num_blocks, *page), torch.float32, seed=n).mul(50).to(dtype)
    layers = layouts_of(kind, alloc)
    caches = list(layers.unbind(0)) if kind == "stacked" else layers
    ids = torch.randint(0, num_blocks, (n,), generator=torch.Generator().manual_seed(n))
    want = torch.zeros((n, num_layers, *page), dtype=dtype)
    for i, block in enumerate(ids.tolist()):
        for layer in range(num_layers):
            want[i, layer] = caches[layer][block]
    assert torch.equal(reference.gather_blocks(layers, ids), want)
    out = torch.full_like(want, 3)
    assert reference.gather_blocks(layers, ids, out=out) is out
    assert torch.equal(out, want)


@pytest.mark.parametrize("num_layers,num_blocks,page,n", GATHER_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_scatter_blocks_matches_loop(num_layers, num_blocks, page, n, kind):
    alloc = rand((num_layers, num_blocks, *page), torch.bfloat16, seed=n)
    layers = layouts_of(kind, alloc)
    caches = list(layers.unbind(0)) if kind == "stacked" else layers
    want = [c.clone() for c in caches]
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))[:n]
    buf = rand((len(ids), num_layers, *page), torch.bfloat16, seed=99)
    for i, block in enumerate(ids.tolist()):
        for layer in range(num_layers):
            want[layer][block] = buf[i, layer]
    reference.scatter_blocks(buf, layers, ids)
    assert all(torch.equal(c, w) for c, w in zip(caches, want, strict=True))


def test_reference_gather_then_scatter_is_identity():
    alloc = rand((4, 20, 3, 32, 16), torch.bfloat16)
    ids = torch.tensor([7, 0, 19, 3])
    buf = reference.gather_blocks(alloc, ids)
    restored = torch.zeros_like(alloc)
    reference.scatter_blocks(buf, restored, ids)
    assert torch.equal(restored[:, ids], alloc[:, ids])
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[ids] = False
    assert not restored[:, untouched].any()
    assert torch.equal(reference.gather_blocks(restored, ids), buf)


# --- block size -------------------------------------------------------------------------------


def _bs_cases():
    cases = [
        (16, 32, 45),
        (32, 16, 45),
        (32, 48, 70),
        (48, 32, 70),
        (16, 16, 32),
        (32, 16, 1),
        (1, 32, 33),
        (32, 1, 5),
        (16, 32, 64),
        (32, 64, 32),
    ]
    rng = random.Random(7)
    for _ in range(8):
        src, dst = rng.choice([1, 3, 8, 16, 32, 48]), rng.choice([2, 5, 16, 32, 64])
        cases.append((src, dst, rng.randint(1, 150)))
    return cases


def slow_convert_block_size(blocks, fmt, heads, dim, src_bs, dst_bs, num_tokens):
    n_dst = -(-num_tokens // dst_bs)
    out = torch.zeros((n_dst, blocks.shape[1], *page_shape(fmt, heads, dst_bs, dim)), dtype=blocks.dtype)
    moves = [
        (
            t // src_bs,
            t // dst_bs,
            layer,
            page_offset(fmt, heads, src_bs, dim, kv, t % src_bs, h, d),
            page_offset(fmt, heads, dst_bs, dim, kv, t % dst_bs, h, d),
        )
        for layer in range(blocks.shape[1])
        for kv in (0, 1)
        for t in range(num_tokens)
        for h in range(heads)
        for d in range(dim)
    ]
    slow_move(blocks, out, moves)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("src_bs,dst_bs,num_tokens", _bs_cases())
def test_reference_convert_block_size_matches_loop(fmt, src_bs, dst_bs, num_tokens):
    heads, dim, layers = 3, 4, 2
    n_src = -(-num_tokens // src_bs)
    dtype = DTYPES[num_tokens % 3]
    blocks = rand((n_src, layers, *page_shape(fmt, heads, src_bs, dim)), dtype, seed=num_tokens)
    got = reference.convert_block_size(blocks, src_bs, dst_bs, num_tokens, fmt=fmt)
    assert torch.equal(got, slow_convert_block_size(blocks, fmt, heads, dim, src_bs, dst_bs, num_tokens))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("src_bs,dst_bs,num_tokens", [(16, 32, 45), (32, 16, 45), (32, 48, 70), (7, 5, 36)])
def test_reference_convert_block_size_there_and_back_is_identity(fmt, src_bs, dst_bs, num_tokens):
    heads, dim = 2, 8
    n_src = -(-num_tokens // src_bs)
    raw = rand((n_src, 3, *page_shape(fmt, heads, src_bs, dim)), torch.bfloat16)
    # zero the unused slots of the last block, as a round trip does
    blocks = slow_convert_block_size(raw, fmt, heads, dim, src_bs, src_bs, num_tokens)
    there = reference.convert_block_size(blocks, src_bs, dst_bs, num_tokens, fmt=fmt)
    back = reference.convert_block_size(there, dst_bs, src_bs, num_tokens, fmt=fmt)
    assert torch.equal(back, blocks)


def test_reference_convert_block_size_pads_last_block_with_zeros():
    blocks = torch.ones((1, 1, 2, 32, 8))  # cpu/hnd page [H, bs, 2D], 32 tokens of ones
    got = reference.convert_block_size(blocks, 32, 48, 20, fmt="gpu_hnd")
    assert got.shape == (1, 1, 2, 48, 8)
    assert got[:, :, :, :20].eq(1).all() and got[:, :, :, 20:].eq(0).all()


# --- heads across tensor-parallel ranks -------------------------------------------------------


def owned_heads(heads: int, tp: int, rank: int) -> list[int]:
    if heads % tp == 0:
        per = heads // tp
        return list(range(rank * per, (rank + 1) * per))
    return [rank // (tp // heads)]  # vLLM replicates each KV head on tp/heads consecutive ranks


def slow_split(blocks, fmt, heads, bs, dim, tp):
    parts = []
    for rank in range(tp):
        mine = owned_heads(heads, tp, rank)
        part = torch.zeros(
            (blocks.shape[0], blocks.shape[1], *page_shape(fmt, len(mine), bs, dim)), dtype=blocks.dtype
        )
        moves = [
            (
                b,
                b,
                layer,
                page_offset(fmt, heads, bs, dim, kv, t, h, d),
                page_offset(fmt, len(mine), bs, dim, kv, t, j, d),
            )
            for b in range(blocks.shape[0])
            for layer in range(blocks.shape[1])
            for kv in (0, 1)
            for t in range(bs)
            for j, h in enumerate(mine)
            for d in range(dim)
        ]
        slow_move(blocks, part, moves)
        parts.append(part)
    return parts


TP_CASES = [(2, 1), (2, 2), (4, 2), (4, 4), (6, 3), (8, 2), (1, 2), (2, 4), (3, 6), (1, 1)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("heads,tp", TP_CASES)
def test_reference_split_heads_for_tp_matches_loop(fmt, heads, tp):
    bs, dim = 4, 3
    blocks = rand((3, 2, *page_shape(fmt, heads, bs, dim)), torch.float32, seed=heads * 10 + tp)
    got = reference.split_heads_for_tp(blocks, tp, fmt=fmt)
    want = slow_split(blocks, fmt, heads, bs, dim, tp)
    assert len(got) == tp and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("heads,tp", TP_CASES)
def test_reference_merge_heads_from_tp_inverts_split(fmt, heads, tp):
    blocks = rand((2, 3, *page_shape(fmt, heads, 8, 4)), torch.bfloat16, seed=tp)
    parts = reference.split_heads_for_tp(blocks, tp, fmt=fmt)
    assert torch.equal(reference.merge_heads_from_tp(parts, fmt=fmt, num_kv_heads=heads), blocks)


# --- layouts ----------------------------------------------------------------------------------


def slow_convert_layout(blocks, src_fmt, dst_fmt, heads, bs, dim):
    out = torch.zeros(
        (blocks.shape[0], blocks.shape[1], *page_shape(dst_fmt, heads, bs, dim)), dtype=blocks.dtype
    )
    moves = [
        (
            b,
            b,
            layer,
            page_offset(src_fmt, heads, bs, dim, kv, t, h, d),
            page_offset(dst_fmt, heads, bs, dim, kv, t, h, d),
        )
        for b in range(blocks.shape[0])
        for layer in range(blocks.shape[1])
        for kv in (0, 1)
        for t in range(bs)
        for h in range(heads)
        for d in range(dim)
    ]
    slow_move(blocks, out, moves)
    return out


LAYOUT_SHAPES = [(1, 1, 1), (3, 16, 4), (2, 32, 8), (5, 7, 3), (1, 64, 2)]


@pytest.mark.parametrize("src_fmt", FORMATS)
@pytest.mark.parametrize("dst_fmt", FORMATS)
@pytest.mark.parametrize("heads,bs,dim", LAYOUT_SHAPES)
def test_reference_convert_layout_matches_loop(src_fmt, dst_fmt, heads, bs, dim):
    blocks = rand((2, 2, *page_shape(src_fmt, heads, bs, dim)), torch.float32, seed=bs)
    got = reference.convert_layout(blocks, src_fmt, dst_fmt)
    assert torch.equal(got, slow_convert_layout(blocks, src_fmt, dst_fmt, heads, bs, dim))


@pytest.mark.parametrize("gpu_fmt,isa", [("gpu_nhd", "vec"), ("gpu_hnd", "vec16")])
def test_reference_cpu_to_gpu_and_back_is_identity(gpu_fmt, isa):
    blocks = rand((2, 1, 3, 32, 128), torch.bfloat16)  # SmolLM2 page: [H=3, bs=32, 2*64]
    there = reference.cpu_to_gpu_layout(blocks, isa=isa, gpu_fmt=gpu_fmt)
    assert torch.equal(there, slow_convert_layout(blocks, "cpu_nhbc", gpu_fmt, 3, 32, 64))
    assert torch.equal(reference.gpu_to_cpu_layout(there, isa=isa, gpu_fmt=gpu_fmt), blocks)


def test_reference_scatter_blocks_into_one_cache_listed_twice_keeps_the_last_layer():
    cache = torch.zeros(6, 2, 4)
    buf = torch.stack([torch.full((2, 2, 4), 1.0), torch.full((2, 2, 4), 2.0)], dim=1)  # [n=2, L=2, page]
    reference.scatter_blocks(buf, [cache, cache], torch.tensor([1, 4]))
    assert cache[[1, 4]].eq(2).all() and cache[[0, 2, 3, 5]].eq(0).all()
