"""The vLLM engine's KV layout: derived from vLLM's config, checked against its cache tensors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvrelay.schemas.messages import KVLayout
from kvrelay.transport.errors import LayoutMismatch
from kvrelay.workers.vllm_engine.layout import block_target, layout_from_vllm_config

LAYOUT = KVLayout(
    num_layers=3, num_kv_heads=2, head_dim=4, block_size=2, dtype="float32", page_elems=2 * 2 * 2 * 4
)


def vllm_like_caches(
    num_blocks: int = 5, layout: KVLayout = LAYOUT
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One allocation, layer after layer, each (blocks, heads, block_size, 2*head_dim): vLLM's CPU cache."""
    per_layer = num_blocks * layout.page_elems
    flat = torch.zeros(layout.num_layers * per_layer)
    shape = (num_blocks, layout.num_kv_heads, layout.block_size, 2 * layout.head_dim)
    caches = {
        f"model.layers.{i}.self_attn.attn": flat[i * per_layer : (i + 1) * per_layer].view(shape)
        for i in range(layout.num_layers)
    }
    return flat, caches


def test_layout_block_target_views_the_one_allocation_block_major() -> None:
    _, caches = vllm_like_caches()
    target = block_target(caches, LAYOUT)
    assert tuple(target.kv.shape) == (5, 3, 32)
    target.kv[4, 2].fill_(9.0)  # block 4 of layer 2
    assert bool((caches["model.layers.2.self_attn.attn"][4] == 9.0).all())
    assert float(caches["model.layers.1.self_attn.attn"].abs().sum()) == 0.0


def test_layout_block_target_rejects_other_shapes_dtypes_and_allocations() -> None:
    _, caches = vllm_like_caches()
    with pytest.raises(LayoutMismatch):
        block_target(caches, LAYOUT.replace(num_layers=2))
    with pytest.raises(LayoutMismatch):
        block_target(caches, LAYOUT.replace(dtype="bfloat16"))
    with pytest.raises(LayoutMismatch):
        block_target(caches, LAYOUT.replace(head_dim=8, page_elems=64))
    separate = {k: v.clone() for k, v in caches.items()}
    with pytest.raises(LayoutMismatch):
        block_target(separate, LAYOUT)


def test_layout_from_vllm_config() -> None:
    mc = SimpleNamespace(
        dtype=torch.bfloat16,
        get_num_kv_heads=lambda pc: 3,
        get_head_size=lambda: 64,
        get_num_layers=lambda pc: 30,
    )
    vc = SimpleNamespace(
        model_config=mc, parallel_config=None, cache_config=SimpleNamespace(cache_dtype="auto", block_size=32)
    )
    lay = layout_from_vllm_config(vc)
    assert (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.block_size, lay.dtype) == (
        30,
        3,
        64,
        32,
        "bfloat16",
    )
    assert lay.page_elems == 3 * 32 * 2 * 64
    vc.cache_config.cache_dtype = "fp8"
    with pytest.raises(LayoutMismatch):
        layout_from_vllm_config(vc)
