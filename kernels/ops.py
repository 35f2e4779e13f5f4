"""Public KV block operations: check every input, then run Triton on CUDA or the torch reference.

Each function raises ``KernelInputError`` (a ValueError) naming the bad argument before any byte
moves. Dispatch: a CUDA tensor with ``triton`` importable runs the Triton kernel
(``triton_blocks.py``); anything else (CPU tensors, no triton) runs ``reference.py``.
``backend_for(tensor)`` says which one a tensor gets.

Shapes (n = blocks, L = layers, NB = blocks per layer cache; page formats in layouts.py):
    gather_blocks(layers: L x [NB, *page], block_ids: [n] int64)  -> [n, L, *page]
    scatter_blocks(buf: [n, L, *page], layers, block_ids)          -> None (in place)
    convert_block_size([ceil(T/src_bs), L, *page(src_bs)], ...)    -> [ceil(T/dst_bs), L, *page(dst_bs)]
    split_heads_for_tp([n, L, *page(H)], tp)                        -> tp x [n, L, *page(H/tp)]
    merge_heads_from_tp(tp x [n, L, *page(H/tp)])                   -> [n, L, *page(H)]
    convert_layout / cpu_to_gpu_layout / gpu_to_cpu_layout          [n, L, *page] -> [n, L, *page']
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from kvrelay.kernels import _checks as check
from kvrelay.kernels import reference
from kvrelay.kernels.errors import KernelInputError
from kvrelay.kernels.layouts import GPU_HND, GPU_NHD, PageSpec, cpu_format_for_isa

GPU_FORMATS = (GPU_NHD, GPU_HND)


@functools.lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    try:
        return importlib.import_module("kvrelay.kernels.triton_blocks")
    except ImportError:  # no triton (or a broken one): the torch reference serves every call
        return None


def triton_available() -> bool:
    """Whether the Triton kernels can be imported here (a GPU is a separate question)."""
    return _triton_module() is not None


def backend_for(t: Tensor) -> str:
    """ "triton" when ops on ``t`` run the Triton kernels, else "torch" (the reference)."""
    return "triton" if t.is_cuda and _triton_module() is not None else "torch"


def _triton_for(t: Tensor) -> ModuleType | None:
    return _triton_module() if t.is_cuda else None


# --- gather / scatter -------------------------------------------------------------------------


def gather_blocks(
    layers: Sequence[Tensor] | Tensor, block_ids: Tensor, *, out: Tensor | None = None, check_ids: bool = True
) -> Tensor:
    """Copy blocks ``block_ids`` of every layer into one contiguous [n, L, *page] buffer.

    ``out`` (optional, [n, L, *page], contiguous) avoids an allocation on the hot path.
    ``check_ids=False`` skips the id range check (a device sync on CUDA).
    """
    caches = check.layers(layers)
    first = caches[0]
    ids = check.block_ids(block_ids, first.shape[0], first.device, check=check_ids, unique=False)
    shape = (ids.numel(), len(caches), *first.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    else:
        check.buffer("out", out, shape, first, "layers")
    kernels = _triton_for(first)
    if kernels is not None:
        return kernels.gather_blocks(caches, ids, out)
    return reference.gather_blocks(caches, ids, out=out)


def scatter_blocks(
    buf: Tensor, layers: Sequence[Tensor] | Tensor, block_ids: Tensor, *, check_ids: bool = True
) -> None:
    """Write buf[i, l] into block ``block_ids[i]`` of layer l, in place (inverse of gather).

    ``block_ids`` must be distinct (checked unless ``check_ids=False``).
    """
    caches = check.layers(layers)
    first = caches[0]
    ids = check.block_ids(block_ids, first.shape[0], first.device, check=check_ids, unique=True)
    check.buffer("buf", buf, (ids.numel(), len(caches), *first.shape[1:]), first, "layers")
    kernels = _triton_for(first)
    if kernels is not None:
        kernels.scatter_blocks(buf, caches, ids)
    else:
        reference.scatter_blocks(buf, caches, ids)


# --- block size -------------------------------------------------------------------------------


def convert_block_size(
    blocks: Tensor, src_bs: int, dst_bs: int, num_tokens: int, *, fmt: str, out: Tensor | None = None
) -> Tensor:
    """Re-chunk one request's KV from ``src_bs``-token blocks to ``dst_bs``-token blocks.

    blocks: [ceil(num_tokens / src_bs), L, *page(src_bs)] in format ``fmt`` (layouts.py).
    Returns [ceil(num_tokens / dst_bs), L, *page(dst_bs)]; token t lands in block t // dst_bs,
    slot t % dst_bs; slots past ``num_tokens`` in the last block are zero.
    """
    src_bs = check.positive_int("src_bs", src_bs)
    dst_bs = check.positive_int("dst_bs", dst_bs)
    num_tokens = check.positive_int("num_tokens", num_tokens, minimum=0)
    blocks, src = check.pages("blocks", blocks, fmt)
    if src.block_size != src_bs:
        raise KernelInputError("blocks", f"pages hold {src.block_size} tokens, but src_bs is {src_bs}")
    n_src = -(-num_tokens // src_bs)
    if blocks.shape[0] != n_src:
        raise KernelInputError(
            "blocks", f"{num_tokens} tokens fill {n_src} blocks of {src_bs}, got {blocks.shape[0]}"
        )
    dst = src.with_(block_size=dst_bs)
    shape = (-(-num_tokens // dst_bs), blocks.shape[1], *dst.shape)
    out = _output(out, shape, blocks)
    kernels = _triton_for(blocks)
    if kernels is None:
        return reference.convert_block_size(blocks, src_bs, dst_bs, num_tokens, fmt=fmt, out=out)
    kernels.remap(blocks, src, out, dst, num_tokens=num_tokens)
    return out


# --- heads across tensor-parallel ranks -------------------------------------------------------


def _check_tp(num_kv_heads: int, tp: int) -> None:
    if num_kv_heads % tp and tp % num_kv_heads:
        raise KernelInputError(
            "tp",
            f"{num_kv_heads} KV heads cannot be sharded over tp={tp}: vLLM needs tp to divide the "
            "KV heads, or the KV heads to divide tp (each head then replicated on tp/heads ranks)",
        )


def split_heads_for_tp(
    blocks: Tensor, tp: int, *, fmt: str, out: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """Split pages [n, L, *page(H)] into ``tp`` parts [n, L, *page(H_r)] as vLLM shards KV heads.

    tp divides H: rank r gets heads [r*H/tp, (r+1)*H/tp). H divides tp: rank r gets head
    r // (tp/H) (replicated). Anything else raises KernelInputError. ``out`` (optional): the tp
    part tensors to fill, each [n, L, *page(H_r)] contiguous.
    """
    tp = check.positive_int("tp", tp)
    blocks, src = check.pages("blocks", blocks, fmt)
    _check_tp(src.num_kv_heads, tp)
    ranges = reference.tp_head_ranges(src.num_kv_heads, tp)
    part_shape = (
        blocks.shape[0],
        blocks.shape[1],
        *src.with_(num_kv_heads=ranges[0][1] - ranges[0][0]).shape,
    )
    if out is None:
        out = [torch.empty(part_shape, dtype=blocks.dtype, device=blocks.device) for _ in ranges]
    elif isinstance(out, Tensor) or not isinstance(out, Sequence) or len(out) != tp:
        raise KernelInputError("out", f"must be a list of {tp} tensors, one per rank")
    else:
        out = [check.buffer(f"out[{r}]", part, part_shape, blocks, "blocks") for r, part in enumerate(out)]
    kernels = _triton_for(blocks)
    if kernels is None:
        return reference.split_heads_for_tp(blocks, tp, fmt=fmt, out=out)
    for part, (start, stop) in zip(out, ranges, strict=True):
        dst = src.with_(num_kv_heads=stop - start)
        kernels.remap(blocks, src, part, dst, num_tokens=blocks.shape[0] * src.block_size,
                      src_head0=start, num_heads=stop - start)  # fmt: skip
    return list(out)


def merge_heads_from_tp(
    parts: Sequence[Tensor], *, fmt: str, num_kv_heads: int | None = None, out: Tensor | None = None
) -> Tensor:
    """Inverse of ``split_heads_for_tp``: tp x [n, L, *page(H_r)] -> [n, L, *page(H)].

    ``num_kv_heads`` defaults to H_r * tp; pass the real count when heads were replicated.
    """
    first, part_spec = _check_parts(parts, fmt)
    tp = len(parts)
    if num_kv_heads is None:
        num_kv_heads = part_spec.num_kv_heads * tp
    heads = check.positive_int("num_kv_heads", num_kv_heads)
    _check_tp(heads, tp)
    per_rank = heads // tp if heads % tp == 0 else 1
    if part_spec.num_kv_heads != per_rank:
        raise KernelInputError(
            "parts",
            f"{heads} heads over tp={tp} give {per_rank} per rank, parts hold {part_spec.num_kv_heads}",
        )
    dst = part_spec.with_(num_kv_heads=heads)
    out = _output(out, (first.shape[0], first.shape[1], *dst.shape), first)
    kernels = _triton_for(first)
    if kernels is None:
        return reference.merge_heads_from_tp(parts, fmt=fmt, num_kv_heads=heads, out=out)
    seen: set[int] = set()
    for part, (start, stop) in zip(parts, reference.tp_head_ranges(heads, tp), strict=True):
        if start not in seen:  # replicas of one head are the same bytes: copy one
            seen.add(start)
            kernels.remap(part, part_spec, out, dst, num_tokens=first.shape[0] * dst.block_size,
                          dst_head0=start, num_heads=stop - start)  # fmt: skip
    return out


def _check_parts(parts: object, fmt: str) -> tuple[Tensor, PageSpec]:
    """Per-rank pages of one shape, dtype and device; returns the first and its PageSpec."""
    if isinstance(parts, Tensor) or not isinstance(parts, Sequence) or not parts:
        raise KernelInputError("parts", "must be a non-empty list of page tensors, one per rank")
    first, spec = check.pages("parts[0]", parts[0], fmt)
    for r, part in enumerate(parts):
        part, _ = check.pages(f"parts[{r}]", part, fmt)
        if part.shape != first.shape:
            shapes = f"{list(part.shape)} differs from parts[0]'s {list(first.shape)}"
            raise KernelInputError(f"parts[{r}]", f"shape {shapes}")
        check.same_as(f"parts[{r}]", part, first, "parts[0]")
    return first, spec


# --- layouts ----------------------------------------------------------------------------------


def convert_layout(blocks: Tensor, src_fmt: str, dst_fmt: str, *, out: Tensor | None = None) -> Tensor:
    """Re-lay pages [n, L, *page] from ``src_fmt`` to ``dst_fmt`` (layouts.py): same tokens, heads."""
    blocks, src = check.pages("blocks", blocks, src_fmt)
    dst = PageSpec(dst_fmt, src.num_kv_heads, src.block_size, src.head_dim)
    check.page_dtype("blocks", blocks, dst_fmt)
    out = _output(out, (blocks.shape[0], blocks.shape[1], *dst.shape), blocks)
    kernels = _triton_for(blocks)
    if kernels is None:
        return reference.convert_layout(blocks, src_fmt, dst_fmt, out=out)
    kernels.remap(blocks, src, out, dst, num_tokens=blocks.shape[0] * src.block_size)
    return out


def _gpu_fmt(gpu_fmt: str) -> str:
    if gpu_fmt not in GPU_FORMATS:
        raise KernelInputError("gpu_fmt", f"must be one of {list(GPU_FORMATS)}, got {gpu_fmt!r}")
    return gpu_fmt


def cpu_to_gpu_layout(
    blocks: Tensor, *, isa: str, gpu_fmt: str = GPU_NHD, out: Tensor | None = None
) -> Tensor:
    """vLLM CPU pages [n, L, H, bs, 2D] written by attention ISA ``isa`` -> ``gpu_fmt`` pages.

    ``isa`` is the CPU worker's ``_get_attn_isa`` result ("vec", "vec16"; packed ISAs such as
    "amx" raise UnsupportedLayoutError, see layouts.py).
    """
    return convert_layout(blocks, cpu_format_for_isa(isa), _gpu_fmt(gpu_fmt), out=out)


def gpu_to_cpu_layout(
    blocks: Tensor, *, isa: str, gpu_fmt: str = GPU_NHD, out: Tensor | None = None
) -> Tensor:
    """``gpu_fmt`` pages -> vLLM CPU pages [n, L, H, bs, 2D] as attention ISA ``isa`` reads them."""
    return convert_layout(blocks, _gpu_fmt(gpu_fmt), cpu_format_for_isa(isa), out=out)


def _output(out: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return check.buffer("out", out, shape, like, "blocks")
