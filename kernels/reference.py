"""Torch reference implementations of the KV block kernels (CPU or CUDA tensors).

These are the specification the Triton kernels are tested against, and the implementation
``kvrelay.kernels.ops`` runs wherever Triton or a GPU is missing (every CPU worker). They trust
their inputs: ``ops`` checks shapes, dtypes, strides, devices and index ranges first.

Shapes (n = blocks moved, L = layers, NB = blocks in the cache, page = one (block, layer) page):
    layers   list of L tensors [NB, *page] (or one tensor [L, NB, *page]), pages contiguous
    buffer   [n, L, *page] contiguous: one region block = one vLLM block across all layers
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Layers = Sequence[Tensor] | Tensor

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> Tensor:
    """The same memory as integers of the same size: copies need no float support (fp8, bool)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def layer_list(layers: Layers) -> list[Tensor]:
    """Per-layer caches as a list: a stacked [L, NB, *page] tensor is split along dim 0 (views)."""
    return list(layers.unbind(0)) if isinstance(layers, Tensor) else list(layers)


# --- gather / scatter -------------------------------------------------------------------------


def gather_blocks(layers: Layers, block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """Copy blocks ``block_ids`` of every layer into one contiguous buffer.

    layers: L x [NB, *page]; block_ids: [n] int64; out (optional): [n, L, *page]. Returns out.
    """
    caches = layer_list(layers)
    first = caches[0]
    if out is None:
        shape = (block_ids.numel(), len(caches), *first.shape[1:])
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    bits = _bits(out)
    stacked = _stacked_view(caches)
    if stacked is not None:  # one indexed copy of [L, *page] rows into the contiguous buffer
        torch.index_select(stacked, 0, block_ids, out=bits)
        return out
    for layer, cache in enumerate(caches):
        # bits[:, layer]: [n, *page], strided; index_select writes it in place without a temporary.
        torch.index_select(_bits(cache), 0, block_ids, out=bits[:, layer])
    return out


def scatter_blocks(buf: Tensor, layers: Layers, block_ids: Tensor) -> None:
    """Inverse of ``gather_blocks``, in place: layer l's block block_ids[i] <- buf[i, l].

    buf: [n, L, *page]; block_ids: [n] int64, no duplicates (a duplicate would be a write race).
    """
    caches = layer_list(layers)
    bits = _bits(buf)
    stacked = _stacked_view(caches)
    if stacked is not None:  # one copy of L pages per block: ~3x faster than index_copy_ on CPU
        for i, block in enumerate(block_ids.tolist()):
            stacked[block].copy_(bits[i])
        return
    for layer, cache in enumerate(caches):
        _bits(cache).index_copy_(0, block_ids, bits[:, layer])


def _stacked_view(caches: list[Tensor]) -> Tensor | None:
    """The caches as one [NB, L, *page] view of their memory when they are views of one storage
    spaced evenly, forward and without overlap -- layer-major (vLLM's per-layer views, LBHNC or
    LBNHC; a stacked tensor) or block-major (BLHNC) -- else None."""
    first = caches[0]
    num_blocks, block_stride, page = first.shape[0], first.stride(0), first[0].numel()
    step = (
        caches[1].storage_offset() - first.storage_offset() if len(caches) > 1 else num_blocks * block_stride
    )
    for layer, cache in enumerate(caches):
        if (
            cache.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or cache.stride() != first.stride()
            or cache.storage_offset() != first.storage_offset() + layer * step
        ):
            return None
    layer_major = step >= num_blocks * block_stride
    block_major = page <= step and len(caches) * step <= block_stride
    if not (layer_major or block_major):
        return None
    size = (num_blocks, len(caches), *first.shape[1:])
    stride = (block_stride, step, *first.stride()[1:])
    return _bits(first).as_strided(size, stride, first.storage_offset())
