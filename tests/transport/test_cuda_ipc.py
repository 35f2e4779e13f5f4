"""CudaIpcReader against a CudaExportRegion in another process on the same GPU (marked ``gpu``).

Skipped, with the reason, where there is no CUDA device or no cuda-python (``kvrelay[gpu]``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.errors import LeaseExpired, PeerGone
from kvrelay.transport.kv.base import BlockTarget, host_identity
from kvrelay.transport.kv.copy import copy_blocks
from kvrelay.transport.kv.cuda_ipc import cuda_ipc_available, parse_region

LAYOUT = KVLayout(
    num_layers=3, num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16", page_elems=2 * 16 * 2 * 64
)
TICKET = 515

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not cuda_ipc_available()[0], reason=f"cuda-ipc not available: {cuda_ipc_available()[1]}"
    ),
]

EXPORTER = """
import sys, torch
from kvrelay.schemas.messages import KVLayout
from kvrelay.transport.kv.cuda_ipc import CudaExportRegion
lay = KVLayout.from_mapping({layout!r})
r = CudaExportRegion(lay, 32)
r.data.copy_(torch.arange(r.data.numel(), device="cuda").remainder(251).to(r.data.dtype).view(r.data.shape))
r.set_tickets(list(range(32)), {ticket})
print("@@", r.name, flush=True)
for line in sys.stdin:
    r.clear_tickets([int(line)])
    print("@@ ok", flush=True)
"""


def expected() -> torch.Tensor:
    n = 32 * LAYOUT.num_layers * LAYOUT.page_elems
    return torch.arange(n, device="cuda").remainder(251).to(torch.bfloat16).view(32, LAYOUT.num_layers, -1)


@pytest.fixture(scope="module")
def exporters():
    procs = []
    for _ in range(2):
        code = textwrap.dedent(EXPORTER.format(layout=LAYOUT.to_mapping(), ticket=TICKET))
        p = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        procs.append(p)
    names = [_answer(p)[3:] for p in procs]
    yield procs, names
    for p in procs:
        p.kill()
        p.wait(30)


def _answer(p) -> str:
    while True:
        line = p.stdout.readline()
        assert line, "the exporter process ended"
        if line.startswith("@@"):
            return line.strip()


def desc_for(region: str, blocks: list[int]) -> KVDescriptor:
    return KVDescriptor(
        backend="cuda-ipc",
        worker_id="p",
        host=host_identity(),
        region=region,
        block_ids=blocks,
        num_tokens=16 * len(blocks),
        ticket=TICKET,
        lease_expires_ms=int(time.time() * 1000) + 60_000,
        layout=LAYOUT,
    )


def cache(num_blocks: int, layer_major: bool) -> BlockTarget:
    L, P = LAYOUT.num_layers, LAYOUT.page_elems
    flat = torch.zeros(num_blocks * L * P, dtype=torch.bfloat16, device="cuda")
    strides = (P, num_blocks * P, 1) if layer_major else (L * P, P, 1)
    return BlockTarget(kv=torch.as_strided(flat, (num_blocks, L, P), strides), layout=LAYOUT)


@pytest.mark.parametrize("layer_major", [True, False])
def test_cuda_ipc_read_copies_blocks(exporters, layer_major: bool) -> None:
    from kvrelay.transport.kv.cuda_ipc import CudaIpcReader

    _, names = exporters
    reader = CudaIpcReader(max_peers=4)
    try:
        src, dst = [1, 2, 3, 7, 20], [4, 5, 6, 0, 9]
        tgt = cache(12, layer_major)
        res = reader.read(desc_for(names[0], src), tgt, dst, timeout_s=30)
        assert res.blocks == 5
        want = expected()
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(tgt.kv[d], want[s])
        assert float(tgt.kv[[1, 2, 3, 7, 8]].float().abs().sum()) == 0.0
    finally:
        reader.close()


def test_cuda_ipc_open_handles_are_bounded_and_cached(exporters) -> None:
    from kvrelay.transport.kv.cuda_ipc import CudaIpcReader

    _, names = exporters
    reader = CudaIpcReader(max_peers=1)
    try:
        for name in (names[0], names[0], names[1], names[0]):
            reader.read(desc_for(name, [0]), cache(2, True), [1], timeout_s=30)
            assert reader.open_handles == 1
    finally:
        reader.close()


def test_cuda_ipc_cleared_ticket_is_lease_expired(exporters) -> None:
    from kvrelay.transport.kv.cuda_ipc import CudaIpcReader

    procs, names = exporters
    procs[1].stdin.write("30\n")
    procs[1].stdin.flush()
    assert _answer(procs[1]) == "@@ ok"
    reader = CudaIpcReader()
    try:
        with pytest.raises(LeaseExpired):
            reader.read(desc_for(names[1], [29, 30]), cache(4, True), [0, 1], timeout_s=30)
        with pytest.raises(PeerGone):
            reader.read(desc_for("cuda-ipc:1:bad", [0]), cache(2, True), [0], timeout_s=30)
    finally:
        reader.close()
    assert parse_region(names[0]).num_blocks == 32


def test_cuda_copy_blocks_many_runs_use_the_kernels() -> None:
    src = torch.randn(64, 3, 128, device="cuda").to(torch.bfloat16)
    dst = torch.as_strided(
        torch.zeros(80 * 3 * 128, dtype=torch.bfloat16, device="cuda"), (80, 3, 128), (128, 80 * 128, 1)
    )
    src_ids = list(range(0, 64, 2))  # 32 runs of one block
    dst_ids = [79 - i for i in range(len(src_ids))]
    copy_blocks(src, src_ids + [1, 3, 5], dst, dst_ids + [0, 1, 2])
    for s, d in zip(src_ids + [1, 3, 5], dst_ids + [0, 1, 2], strict=True):
        assert torch.equal(dst[d], src[s])
