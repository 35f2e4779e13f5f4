"""Triton kernel for KV block gather/scatter (CUDA).

Imported lazily by ``kvrelay.kernels.ops`` only when a CUDA tensor arrives and ``triton`` imports;
this module imports triton at the top, so importing it without triton raises ImportError.
The launchers here trust their inputs (``ops`` has checked them).

``_copy_pages_kernel``: one program per (block, layer, page tile); copies a contiguous tile of a
page between a per-layer cache block and the contiguous buffer [n, L, page]. Offsets are int64.
Layers are addressed from layer 0's base pointer plus a layer offset: ``layer * layer_stride``
when the layers are evenly spaced (vLLM's views of one allocation, or a stacked tensor) --
integer arguments divisible by 16 let Triton prove 16-byte alignment and emit vector loads --
else an int64 table of per-layer element offsets.

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

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PAGE_TILE = 4096  # elements per program of the page copy (8 KiB of bf16)
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
