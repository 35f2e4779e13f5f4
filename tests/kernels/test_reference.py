"""The torch reference kernels against slow, obviously correct loops, on many random shapes."""

from __future__ import annotations

import pytest
import torch

from kvrelay.kernels import reference


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


def test_reference_scatter_blocks_into_one_cache_listed_twice_keeps_the_last_layer():
    cache = torch.zeros(6, 2, 4)
    buf = torch.stack([torch.full((2, 2, 4), 1.0), torch.full((2, 2, 4), 2.0)], dim=1)  # [n=2, L=2, page]
    reference.scatter_blocks(buf, [cache, cache], torch.tensor([1, 4]))
    assert cache[[1, 4]].eq(2).all() and cache[[0, 2, 3, 5]].eq(0).all()
