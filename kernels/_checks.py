"""Input checks shared by the public kernel wrappers; each failure is a precise KernelInputError."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvrelay.kernels.errors import KernelInputError

_COPY_SIZES = (1, 2, 4, 8)


def tensor(arg: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise KernelInputError(arg, f"expected a torch.Tensor, got {type(value).__name__}")
    if value.element_size() not in _COPY_SIZES:
        raise KernelInputError(
            arg, f"dtype {value.dtype} is {value.element_size()} bytes; kernels move 1/2/4/8-byte elements"
        )
    return value


def same_as(arg: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise KernelInputError(arg, f"dtype {t.dtype} differs from {ref_name}'s {ref.dtype}")
    if t.device != ref.device:
        raise KernelInputError(arg, f"is on {t.device}, {ref_name} on {ref.device}")


def contiguous(arg: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise KernelInputError(arg, f"must be contiguous (shape {list(t.shape)}, strides {list(t.stride())})")


def layers(value: object) -> list[Tensor]:
    """A non-empty list of per-layer caches [NB, *page] of one shape, dtype and device.

    Each page must be contiguous and blocks must not overlap; the block stride is free, so
    views of one allocation (vLLM) and stacked tensors both pass. For vLLM 0.32's GPU layout
    LBNHC pass the physical-order view ``cache.transpose(1, 2)`` ([NB, block_size, H, 2*D]).
    """
    if isinstance(value, Tensor):
        if value.dim() < 3:
            raise KernelInputError(
                "layers", f"a stacked tensor must be [L, num_blocks, *page], got shape {list(value.shape)}"
            )
        caches = list(value.unbind(0))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        caches = list(value)
    else:
        raise KernelInputError(
            "layers", f"expected a list of tensors or a [L, NB, *page] tensor, got {type(value).__name__}"
        )
    if not caches:
        raise KernelInputError("layers", "is empty")
    first = tensor("layers[0]", caches[0])
    for i, cache in enumerate(caches):
        name = f"layers[{i}]"
        tensor(name, cache)
        if cache.shape != first.shape:
            raise KernelInputError(
                name, f"shape {list(cache.shape)} differs from layers[0]'s {list(first.shape)}"
            )
        same_as(name, cache, first, "layers[0]")
        _check_cache(name, cache)
    return caches


def _check_cache(name: str, cache: Tensor) -> None:
    if cache.dim() < 2 or cache.shape[0] < 1:
        raise KernelInputError(name, f"must be [num_blocks >= 1, *page], got shape {list(cache.shape)}")
    if not cache[0].is_contiguous():
        raise KernelInputError(
            name,
            f"pages must be contiguous (strides {list(cache.stride())} for shape {list(cache.shape)}); "
            "pass the physical-order view, e.g. cache.transpose(1, 2) for vLLM's LBNHC GPU layout",
        )
    if cache.shape[0] > 1 and cache.stride(0) < cache[0].numel():
        raise KernelInputError(
            name, f"block stride {cache.stride(0)} < page size {cache[0].numel()}: blocks overlap"
        )
    if cache.data_ptr() % cache.element_size():
        raise KernelInputError(
            name, f"data pointer is not aligned to its {cache.element_size()}-byte elements"
        )


def block_ids(value: object, num_blocks: int, device: torch.device, *, check: bool, unique: bool) -> Tensor:
    """[n] int64 on ``device``; with ``check``, every id in [0, num_blocks) (and distinct if ``unique``).

    On CUDA the range check reads two numbers back (one device sync); pass check=False on a hot
    path whose ids come from the engine's own block table.
    """
    ids = tensor("block_ids", value)
    if ids.dtype != torch.int64:
        raise KernelInputError("block_ids", f"must be torch.int64, got {ids.dtype}")
    if ids.dim() != 1:
        raise KernelInputError("block_ids", f"must be 1-D [n], got shape {list(ids.shape)}")
    if ids.device != device:
        raise KernelInputError("block_ids", f"is on {ids.device}, the caches on {device}")
    contiguous("block_ids", ids)
    if check and ids.numel():
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one device sync
        if low < 0 or high >= num_blocks:
            bad = low if low < 0 else high
            raise KernelInputError("block_ids", f"id {bad} is out of range [0, {num_blocks})")
        if unique and torch.unique(ids).numel() != ids.numel():
            raise KernelInputError(
                "block_ids", "has duplicates: two buffer rows would race for one cache block"
            )
    return ids


def buffer(arg: str, value: object, shape: tuple[int, ...], like: Tensor, like_name: str) -> Tensor:
    """A contiguous tensor of exactly ``shape`` with ``like``'s dtype and device."""
    buf = tensor(arg, value)
    if tuple(buf.shape) != tuple(shape):
        raise KernelInputError(arg, f"must have shape {list(shape)}, got {list(buf.shape)}")
    same_as(arg, buf, like, like_name)
    contiguous(arg, buf)
    return buf
