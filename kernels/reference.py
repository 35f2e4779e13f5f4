"""Torch reference implementations of the KV block kernels (CPU or CUDA tensors).

These are the specification the Triton kernels are tested against, and the implementation
``kvrelay.kernels.ops`` runs wherever Triton or a GPU is missing (every CPU worker). They trust
their inputs: ``ops`` checks shapes, dtypes, strides, devices and index ranges first.

Shapes (n = blocks moved, L = layers, NB = blocks in the cache, page = one (block, layer) page):
    layers   list of L tensors [NB, *page] (or one tensor [L, NB, *page]), pages contiguous
    buffer   [n, L, *page] contiguous: one region block = one vLLM block across all layers
    tokens   per page, K and V views [n, L, block_size, num_kv_heads, head_dim] (see layouts.py)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvrelay.kernels.layouts import PageSpec, cpu_format_for_isa

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


# --- views of K and V inside pages -------------------------------------------------------------


def kv_views(pages: Tensor, spec: PageSpec) -> tuple[Tensor, Tensor]:
    """K and V of contiguous pages [n, L, *page] as strided views, each [n, L, block_size, H, D]."""
    n, layers = pages.shape[:2]
    size = (n, layers, spec.block_size, spec.num_kv_heads, spec.head_dim)
    views = []
    for base, tok, head, dim in spec.kv_strides():
        stride = (pages.stride(0), pages.stride(1), tok, head, dim)
        views.append(pages.as_strided(size, stride, pages.storage_offset() + base))
    return views[0], views[1]


def _empty_pages(like: Tensor, n: int, spec: PageSpec) -> Tensor:
    return torch.empty((n, like.shape[1], *spec.shape), dtype=like.dtype, device=like.device)


# --- block size -------------------------------------------------------------------------------


def convert_block_size(
    blocks: Tensor, src_bs: int, dst_bs: int, num_tokens: int, *, fmt: str, out: Tensor | None = None
) -> Tensor:
    """Re-chunk a request's KV from blocks of ``src_bs`` tokens to blocks of ``dst_bs`` tokens.

    blocks: [ceil(num_tokens / src_bs), L, *page(src_bs)] in format ``fmt``.
    Returns [ceil(num_tokens / dst_bs), L, *page(dst_bs)]; token t keeps its position (block
    t // dst_bs, slot t % dst_bs). Slots past ``num_tokens`` in the last block are zero.
    """
    src = PageSpec.from_page_shape(fmt, tuple(blocks.shape[2:]))
    dst = src.with_(block_size=dst_bs)
    n_dst = -(-num_tokens // dst_bs)
    if out is None:
        out = _empty_pages(blocks, n_dst, dst)
    layers = blocks.shape[1]
    for src_view, dst_view in zip(kv_views(_bits(blocks), src), kv_views(_bits(out), dst), strict=True):
        # [n_src, L, src_bs, H, D] -> [L, tokens, H, D] (a copy) -> first num_tokens, zero padded
        flat = src_view.transpose(0, 1).reshape(layers, -1, src.num_kv_heads, src.head_dim)
        padded = flat.new_zeros((layers, n_dst * dst_bs, src.num_kv_heads, src.head_dim))
        padded[:, :num_tokens] = flat[:, :num_tokens]
        dst_view.copy_(padded.view(layers, n_dst, dst_bs, src.num_kv_heads, src.head_dim).transpose(0, 1))
    return out


# --- heads across tensor-parallel ranks -------------------------------------------------------


def tp_head_ranges(num_kv_heads: int, tp: int) -> list[tuple[int, int]]:
    """The [start, stop) KV heads rank r holds, as vLLM shards them (QKVParallelLinear).

    tp divides the heads: rank r holds heads [r*H/tp, (r+1)*H/tp). More ranks than heads and the
    heads divide tp: each head is replicated on tp/H consecutive ranks (rank r holds head
    r // (tp/H)). Anything else has no vLLM sharding; ``ops`` rejects it before calling this.
    """
    if num_kv_heads % tp == 0:
        per = num_kv_heads // tp
        return [(r * per, (r + 1) * per) for r in range(tp)]
    replicas = tp // num_kv_heads
    return [(r // replicas, r // replicas + 1) for r in range(tp)]


def split_heads_for_tp(
    blocks: Tensor, tp: int, *, fmt: str, out: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """Split pages [n, L, *page(H)] into ``tp`` parts [n, L, *page(H_r)], one per rank.

    ``out`` (optional): the tp part tensors to fill.
    """
    src = PageSpec.from_page_shape(fmt, tuple(blocks.shape[2:]))
    parts = []
    for rank, (start, stop) in enumerate(tp_head_ranges(src.num_kv_heads, tp)):
        dst = src.with_(num_kv_heads=stop - start)
        part = _empty_pages(blocks, blocks.shape[0], dst) if out is None else out[rank]
        for src_view, dst_view in zip(kv_views(_bits(blocks), src), kv_views(_bits(part), dst), strict=True):
            dst_view.copy_(src_view[:, :, :, start:stop])
        parts.append(part)
    return parts


def merge_heads_from_tp(
    parts: Sequence[Tensor], *, fmt: str, num_kv_heads: int | None = None, out: Tensor | None = None
) -> Tensor:
    """Inverse of ``split_heads_for_tp``: parts [n, L, *page(H_r)] -> [n, L, *page(H)].

    ``num_kv_heads`` defaults to the sum over parts; pass it when heads were replicated (tp > H).
    """
    part_spec = PageSpec.from_page_shape(fmt, tuple(parts[0].shape[2:]))
    heads = num_kv_heads if num_kv_heads is not None else part_spec.num_kv_heads * len(parts)
    dst = part_spec.with_(num_kv_heads=heads)
    if out is None:
        out = _empty_pages(parts[0], parts[0].shape[0], dst)
    dst_views = kv_views(_bits(out), dst)
    done: set[int] = set()
    for part, (start, stop) in zip(parts, tp_head_ranges(heads, len(parts)), strict=True):
        if start in done:  # a replica of a head already copied
            continue
        done.add(start)
        for src_view, dst_view in zip(kv_views(_bits(part), part_spec), dst_views, strict=True):
            dst_view[:, :, :, start:stop].copy_(src_view)
    return out


# --- layouts ----------------------------------------------------------------------------------


def convert_layout(blocks: Tensor, src_fmt: str, dst_fmt: str, *, out: Tensor | None = None) -> Tensor:
    """Re-lay pages [n, L, *page] from format ``src_fmt`` to ``dst_fmt`` (same heads, tokens)."""
    src = PageSpec.from_page_shape(src_fmt, tuple(blocks.shape[2:]))
    dst = src.with_(fmt=dst_fmt)
    if out is None:
        out = _empty_pages(blocks, blocks.shape[0], dst)
    for src_view, dst_view in zip(kv_views(_bits(blocks), src), kv_views(_bits(out), dst), strict=True):
        dst_view.copy_(src_view)
    return out


def cpu_to_gpu_layout(blocks: Tensor, *, isa: str, gpu_fmt: str, out: Tensor | None = None) -> Tensor:
    """vLLM CPU pages [n, L, H, bs, 2D] (written by ``isa``) -> ``gpu_fmt`` pages."""
    return convert_layout(blocks, cpu_format_for_isa(isa), gpu_fmt, out=out)


def gpu_to_cpu_layout(blocks: Tensor, *, isa: str, gpu_fmt: str, out: Tensor | None = None) -> Tensor:
    """``gpu_fmt`` pages -> vLLM CPU pages [n, L, H, bs, 2D] as ``isa`` reads them."""
    return convert_layout(blocks, gpu_fmt, cpu_format_for_isa(isa), out=out)
