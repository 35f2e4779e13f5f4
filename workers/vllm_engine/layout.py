"""The KV layout of a vLLM engine: computed from its config before it starts, checked against its cache.

vLLM's CPU backend keeps every attention layer's KV in one allocation, layer after layer, each
layer shaped ``(num_blocks, num_kv_heads, block_size, 2 * head_dim)`` (a block's K half then its
V half; the K layout is ISA specific, so blocks are copied whole, never re-arranged).
``block_target`` turns those per-layer tensors into one block-major view
``[num_blocks, num_layers, page_elems]`` that the transfer code copies runs of blocks through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvrelay.schemas.messages import KVLayout
from kvrelay.transport.errors import LayoutMismatch
from kvrelay.transport.kv.base import BlockTarget
from kvrelay.transport.kv.region import torch_dtype

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def layout_from_vllm_config(vc: VllmConfig) -> KVLayout:
    """The layout vLLM will allocate, from its resolved config (no engine needed)."""
    mc, pc, cc = vc.model_config, vc.parallel_config, vc.cache_config
    if cc.cache_dtype != "auto":
        raise LayoutMismatch(f"kv cache dtype {cc.cache_dtype!r} is not supported (only 'auto')")
    dtype = str(mc.dtype).removeprefix("torch.")
    heads, head_dim, bs = mc.get_num_kv_heads(pc), mc.get_head_size(), cc.block_size
    return KVLayout(
        num_layers=mc.get_num_layers(pc),
        num_kv_heads=heads,
        head_dim=head_dim,
        block_size=bs,
        dtype=dtype,
        page_elems=heads * bs * 2 * head_dim,
    )


def block_target(kv_caches: dict[str, torch.Tensor], layout: KVLayout) -> BlockTarget:
    """One block-major view over vLLM's per-layer caches; ``LayoutMismatch`` if they are not as expected."""
    layers = list(kv_caches.values())
    if len(layers) != layout.num_layers:
        raise LayoutMismatch(f"vLLM registered {len(layers)} KV layers, the layout says {layout.num_layers}")
    want = (layout.num_kv_heads, layout.block_size, 2 * layout.head_dim)
    dtype = torch_dtype(layout.dtype)
    first = layers[0]
    num_blocks = first.shape[0]
    for name, t in kv_caches.items():
        if tuple(t.shape) != (num_blocks, *want) or t.dtype != dtype:
            raise LayoutMismatch(
                f"KV cache {name} is {tuple(t.shape)} {t.dtype}; expected ({num_blocks}, {want}) {dtype}"
            )
        if t.stride(0) != layout.page_elems or not t[0].is_contiguous():
            raise LayoutMismatch(f"KV cache {name}: blocks are not contiguous pages (strides {t.stride()})")
        if t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            raise LayoutMismatch("KV cache layers are not one allocation")
    step = (
        layers[1].storage_offset() - first.storage_offset()
        if len(layers) > 1
        else num_blocks * layout.page_elems
    )
    for i, t in enumerate(layers):
        if t.storage_offset() != first.storage_offset() + i * step:
            raise LayoutMismatch("KV cache layers are not evenly spaced in their allocation")
    # [num_blocks, num_layers, page_elems] over the layer-major allocation
    kv = torch.as_strided(
        first, (num_blocks, layout.num_layers, layout.page_elems), (layout.page_elems, step, 1)
    )
    return BlockTarget(kv=kv, layout=layout)
