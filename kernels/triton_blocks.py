"""Triton kernels for KV block gather/scatter and in-page re-layout (CUDA).

Imported lazily by ``kvrelay.kernels.ops`` only when a CUDA tensor arrives and ``triton`` imports;
this module imports triton at the top, so importing it without triton raises ImportError.
The launchers here trust their inputs (``ops`` has checked them).

Two kernels:
- ``_copy_pages_kernel``: one program per (block, layer, page tile); copies a contiguous tile of
  a page between a per-layer cache block and the contiguous buffer [n, L, page]. Offsets are
  int64. Layers are addressed from layer 0's base pointer plus a layer offset: ``layer *
  layer_stride`` when the layers are evenly spaced (vLLM's views of one allocation, or a stacked
  tensor) -- integer arguments divisible by 16 let Triton prove 16-byte alignment and emit vector
  loads -- else an int64 table of per-layer element offsets.
- ``_remap_kernel``: one program per (destination block, layer, token tile, head tile), holding
  [tokens, heads, head_dim] of K and then V; moves them between two page formats, block sizes and
  head ranges using the affine in-page strides of ``PageSpec.kv_strides``. Whole head rows per
  program keep GPU-format loads contiguous (vectorized when head_dim is a multiple of 8). Slots
  past ``num_tokens`` get zeros.

Bytes are moved as same-size integers (bf16 as int16, fp8 as int8, ...): a copy needs no float
type support, and fp8/bool pages work on every GPU Triton supports.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvrelay.kernels.layouts import PageSpec

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PAGE_TILE = 4096  # elements per program of the page copy (8 KiB of bf16)
_REMAP_TILE = 4096  # tokens x heads x head_dim elements per program of the remap
_MAX_OFFSET_TABLES = 64  # cached per-layer offset tables; least recently used evicted beyond this


@triton.jit
def _copy_pages_kernel(
    base_ptr,  # layer 0's cache [NB, page] (as ints); other layers at base + layer offset
    layer_offsets_ptr,  # [L] int64 element offsets from base (read when not UNIFORM)
    layer_stride,  # elements between consecutive layers (when UNIFORM)
    block_stride,  # elements between consecutive blocks of one layer
    ids_ptr,  # [n] int64 block ids
    buf_ptr,  # [n, L, page] contiguous
    page_elems,
    n_tiles,  # page tiles per (block, layer)
    UNIFORM: tl.constexpr,
    ALIGN: tl.constexpr,  # every layer offset is a multiple of ALIGN elements
    SCATTER: tl.constexpr,  # False: cache -> buf (gather); True: buf -> cache (scatter)
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    num_layers = tl.num_programs(1).to(tl.int64)
    i = pid // n_tiles
    tile = pid % n_tiles
    block = tl.load(ids_ptr + i).to(tl.int64)
    if UNIFORM:
        layer_off = layer * layer_stride
    else:
        layer_off = tl.load(layer_offsets_ptr + layer)
        if ALIGN > 1:
            layer_off = tl.multiple_of(layer_off, ALIGN)
    cache_off = layer_off + block * block_stride
    buf_off = (i * num_layers + layer) * page_elems
    offs = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < page_elems
    if SCATTER:
        vals = tl.load(buf_ptr + buf_off + offs, mask=mask)
        tl.store(base_ptr + cache_off + offs, vals, mask=mask)
    else:
        vals = tl.load(base_ptr + cache_off + offs, mask=mask)
        tl.store(buf_ptr + buf_off + offs, vals, mask=mask)


# fmt: off
@triton.jit
def _remap_tile(
    src_ptr, dst_ptr,
    src_rows, dst_rows,  # [BLOCK_T]: element offset of each token's (t, head 0, dim 0) in src / dst
    head, dim,  # [BLOCK_H] heads (relative to the copied range), [BLOCK_D] dims
    src_mask, dst_mask,  # [BLOCK_T, BLOCK_H, BLOCK_D]
    s_head, s_dim, d_head, d_dim,  # head and dim strides of K (or V) in src and dst pages
    src_head0, dst_head0,
):
    src_cols = ((head + src_head0) * s_head)[:, None] + (dim * s_dim)[None, :]  # [BLOCK_H, BLOCK_D]
    dst_cols = ((head + dst_head0) * d_head)[:, None] + (dim * d_dim)[None, :]
    vals = tl.load(src_ptr + src_rows[:, None, None] + src_cols[None, :, :], mask=src_mask, other=0)
    tl.store(dst_ptr + dst_rows[:, None, None] + dst_cols[None, :, :], vals, mask=dst_mask)


@triton.jit
def _remap_kernel(
    src_ptr, dst_ptr,  # [n_src, L, page_src], [n_dst, L, page_dst]
    src_n_stride, src_l_stride, dst_n_stride, dst_l_stride,
    src_bs, dst_bs,
    num_tokens,  # tokens t < num_tokens are copied; later slots of dst pages are zeroed
    sk_base, sk_tok, sk_head, sk_dim, sv_base, sv_tok, sv_head, sv_dim,  # src in-page strides, K then V
    dk_base, dk_tok, dk_head, dk_dim, dv_base, dv_tok, dv_head, dv_dim,  # dst in-page strides, K then V
    src_head0, dst_head0,  # first source head copied, and where it lands in dst
    num_heads,  # heads copied
    head_dim,
    n_tok_tiles, n_head_tiles,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= head_dim: one program holds whole head rows (contiguous in GPU pages)
):
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    dst_block = pid // (n_tok_tiles * n_head_tiles)
    tok_tile = (pid // n_head_tiles) % n_tok_tiles
    head_tile = pid % n_head_tiles

    slot = tok_tile * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BLOCK_T] slot in the dst page
    token = dst_block * dst_bs + slot
    head = head_tile * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)  # [BLOCK_H]
    dim = tl.arange(0, BLOCK_D).to(tl.int64)  # [BLOCK_D]
    in_page = slot < dst_bs
    cols = ((head < num_heads)[:, None] & (dim < head_dim)[None, :])[None, :, :]
    dst_mask = in_page[:, None, None] & cols
    src_mask = (in_page & (token < num_tokens))[:, None, None] & cols
    src_page = (token // src_bs) * src_n_stride + layer * src_l_stride  # [BLOCK_T]
    src_slot = token % src_bs
    dst_page = dst_block * dst_n_stride + layer * dst_l_stride
    # K, then V: the same tokens and heads, each with its own in-page strides
    _remap_tile(src_ptr, dst_ptr, src_page + sk_base + src_slot * sk_tok, dst_page + dk_base + slot * dk_tok,
                head, dim, src_mask, dst_mask, sk_head, sk_dim, dk_head, dk_dim, src_head0, dst_head0)
    _remap_tile(src_ptr, dst_ptr, src_page + sv_base + src_slot * sv_tok, dst_page + dv_base + slot * dv_tok,
                head, dim, src_mask, dst_mask, sv_head, sv_dim, dv_head, dv_dim, src_head0, dst_head0)
# fmt: on


# --- launchers --------------------------------------------------------------------------------


def _ints(t: Tensor) -> Tensor:
    return t.view(_INT_OF_SIZE[t.element_size()])


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _alignment(values: list[int]) -> int:
    align = 16
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


_offset_tables: OrderedDict[tuple, Tensor] = OrderedDict()


def _offset_table(offsets: list[int], device: torch.device) -> Tensor:
    """A device tensor of layer offsets, cached by value (the same layers give the same table)."""
    key = (str(device), tuple(offsets))
    table = _offset_tables.get(key)
    if table is None:
        table = torch.tensor(offsets, dtype=torch.int64, device=device)
        _offset_tables[key] = table
        if len(_offset_tables) > _MAX_OFFSET_TABLES:
            _offset_tables.popitem(last=False)
    else:
        _offset_tables.move_to_end(key)
    return table


def _copy_pages(layers: list[Tensor], block_ids: Tensor, buf: Tensor, scatter: bool) -> None:
    n, num_layers = buf.shape[0], len(layers)
    if n == 0:
        return
    base = _ints(layers[0])
    item = layers[0].element_size()
    # element offsets of each layer from layer 0 (exact: ops checked every pointer is item-aligned)
    offsets = [(t.data_ptr() - layers[0].data_ptr()) // item for t in layers]
    step = offsets[1] if num_layers > 1 else 0
    uniform = all(off == layer * step for layer, off in enumerate(offsets))
    table = block_ids if uniform else _offset_table(offsets, buf.device)  # unread when uniform
    page_elems = buf[0, 0].numel()
    block = min(_PAGE_TILE, triton.next_power_of_2(page_elems))
    n_tiles = triton.cdiv(page_elems, block)
    with _device_ctx(buf):
        _copy_pages_kernel[(n * n_tiles, num_layers)](
            base, table, step, layers[0].stride(0), block_ids, _ints(buf), page_elems, n_tiles,
            UNIFORM=uniform, ALIGN=_alignment(offsets), SCATTER=scatter, BLOCK=block,
        )  # fmt: skip


def gather_blocks(layers: list[Tensor], block_ids: Tensor, out: Tensor) -> Tensor:
    """layers: L x [NB, *page]; block_ids: [n] int64; out: [n, L, *page] -> out."""
    _copy_pages(layers, block_ids, out, scatter=False)
    return out


def scatter_blocks(buf: Tensor, layers: list[Tensor], block_ids: Tensor) -> None:
    """buf: [n, L, *page] -> layer l block block_ids[i], in place."""
    _copy_pages(layers, block_ids, buf, scatter=True)


def remap(
    src: Tensor,
    src_spec: PageSpec,
    dst: Tensor,
    dst_spec: PageSpec,
    *,
    num_tokens: int,
    src_head0: int = 0,
    dst_head0: int = 0,
    num_heads: int | None = None,
) -> None:
    """Copy tokens [0, num_tokens) of heads [src_head0, +num_heads) of src pages into dst pages.

    src: [n_src, L, *src_spec.shape]; dst: [n_dst, L, *dst_spec.shape], both contiguous.
    Every slot of every dst page in the head range is written (zeros past num_tokens).
    """
    n_dst, num_layers = dst.shape[:2]
    heads = src_spec.num_kv_heads if num_heads is None else num_heads
    if n_dst == 0 or num_layers == 0:
        return
    block_d = triton.next_power_of_2(src_spec.head_dim)
    block_h = min(triton.next_power_of_2(heads), max(1, _REMAP_TILE // 2 // block_d))
    block_t = max(1, min(triton.next_power_of_2(dst_spec.block_size), _REMAP_TILE // (block_h * block_d)))
    n_tok_tiles = triton.cdiv(dst_spec.block_size, block_t)
    n_head_tiles = triton.cdiv(heads, block_h)
    (sk, sv), (dk, dv) = src_spec.kv_strides(), dst_spec.kv_strides()
    with _device_ctx(dst):
        _remap_kernel[(n_dst * n_tok_tiles * n_head_tiles, num_layers)](
            _ints(src), _ints(dst), src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
            src_spec.block_size, dst_spec.block_size, num_tokens, *sk, *sv, *dk, *dv,
            src_head0, dst_head0, heads, src_spec.head_dim, n_tok_tiles, n_head_tiles,
            BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        )  # fmt: skip
