"""Block copies between KV views: the one place KV bytes are moved between caches and regions.

Every view is *block-major*: ``[num_blocks, num_layers, page_elems]``, possibly strided (vLLM's
CPU cache is layer-major underneath: ``(num_layers, num_blocks, page)`` seen through a
transposed ``as_strided`` view). Copies go in runs of consecutive block ids on both sides, one
``copy_`` per run (memory-copy speed). Many short runs: on CUDA, ``kvrelay.kernels``
gather + scatter (Triton, one launch each, all layers); on CPU ``index_select`` + ``index_copy_``
(the kernels' torch reference gathers at ~1.7 GB/s against ~7 GB/s for a ``copy_`` of a run,
``loadtest/results/kernels_cpu.json``, so it does not help on CPU).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

MAX_RUNS = 32  # past this many runs, one gather + one scatter beats a copy per run


def block_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split paired ids into (src_start, dst_start, length) runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs:
            s0, d0, k = runs[-1]
            if s == s0 + k and d == d0 + k:
                runs[-1] = (s0, d0, k + 1)
                continue
        runs.append((s, d, 1))
    return runs


def _check(src: torch.Tensor, src_ids: Sequence[int], dst: torch.Tensor, dst_ids: Sequence[int]) -> None:
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    if src.dim() != 3 or dst.dim() != 3 or src.shape[1:] != dst.shape[1:]:
        raise ValueError(f"block views differ: {tuple(src.shape)} vs {tuple(dst.shape)}")
    if src.dtype != dst.dtype:
        raise ValueError(f"dtypes differ: {src.dtype} vs {dst.dtype}")
    for name, ids, n in (("source", src_ids, src.shape[0]), ("destination", dst_ids, dst.shape[0])):
        if ids and (min(ids) < 0 or max(ids) >= n):
            raise ValueError(f"{name} block id out of range 0..{n - 1}")


def copy_blocks(src: torch.Tensor, src_ids: Sequence[int], dst: torch.Tensor, dst_ids: Sequence[int]) -> int:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` over block-major views; returns bytes copied.

    src: [S, L, P], dst: [D, L, P], same dtype. Ids are checked against both views.
    """
    _check(src, src_ids, dst, dst_ids)
    runs = block_runs(src_ids, dst_ids)
    if len(runs) <= MAX_RUNS:
        for s, d, k in runs:
            dst[d : d + k].copy_(src[s : s + k])
    elif src.is_cuda and dst.is_cuda:
        from kvrelay import kernels

        s_idx = torch.as_tensor(list(src_ids), dtype=torch.int64, device=src.device)
        d_idx = torch.as_tensor(list(dst_ids), dtype=torch.int64, device=dst.device)
        buf = kernels.gather_blocks(list(src.unbind(1)), s_idx, check_ids=False)  # [n, L, P]
        kernels.scatter_blocks(buf, list(dst.unbind(1)), d_idx, check_ids=False)
    else:
        s_idx = torch.as_tensor(list(src_ids), dtype=torch.int64)
        d_idx = torch.as_tensor(list(dst_ids), dtype=torch.int64)
        dst.index_copy_(0, d_idx, src.index_select(0, s_idx))  # [n, L, P]
    return len(src_ids) * src.shape[1] * src.shape[2] * src.element_size()


def zero_blocks(dst: torch.Tensor, ids: Sequence[int]) -> None:
    """Zero whole blocks of a block-major view."""
    for _s, d, k in block_runs(ids, ids):
        dst[d : d + k].zero_()


def checksum(view: torch.Tensor, ids: Sequence[int]) -> int:
    """crc32 of the blocks' bytes, in the order given (layer by layer within a block)."""
    crc = 0
    for s, _d, k in block_runs(ids, ids):
        part = view[s : s + k].contiguous().view(torch.uint8)
        crc = zlib.crc32(memoryview(part.numpy()), crc)
    return crc
