"""Public KV block operations: check every input, then run Triton on CUDA or the torch reference.

Each function raises ``KernelInputError`` (a ValueError) naming the bad argument before any byte
moves. Dispatch: a CUDA tensor with ``triton`` importable runs the Triton kernel
(``triton_blocks.py``); anything else (CPU tensors, no triton) runs ``reference.py``.
``backend_for(tensor)`` says which one a tensor gets.

Shapes (n = blocks, L = layers, NB = blocks per layer cache, page = one block of one layer):
    gather_blocks(layers: L x [NB, *page], block_ids: [n] int64)  -> [n, L, *page]
    scatter_blocks(buf: [n, L, *page], layers, block_ids)          -> None (in place)
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
