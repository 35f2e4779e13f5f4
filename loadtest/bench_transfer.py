"""``kvrelay bench transfer``: move SmolLM2-shaped KV blocks between two processes through a backend.

An exporter process holds the blocks (an export region in shared memory, served by the backend:
``shm`` and ``cma`` read its mapping, ``tcp`` asks its ``BlockServer``, ``nixl`` its NIXL agent;
``cuda-ipc`` a ``CudaExportRegion`` on the GPU); this process reads them into its own cache, laid
out like vLLM's CPU cache (layer-major, pre-faulted), with the real reader, ticket checks
included. Per prompt length (30 layers, 3 KV heads, head dim 64, block size 32):

    gb_per_s            KV bytes / median read time
    p50_ms, p99_ms      read time percentiles over ``repeats`` reads (after warm-up reads)
    baseline_gb_per_s   one plain copy of the same bytes inside this process (``copy_`` between two
                        pre-faulted buffers; on GPU one device-to-device copy), same run: each
                        read is followed by one baseline copy, so both see the same machine load
    ratio               gb_per_s / baseline_gb_per_s
    export_copy_gb_per_s  (CPU backends) the prefill side's copy of the same blocks from a
                        layer-major cache into the region (copy 1 of the two the disaggregated
                        CPU path makes; the read above is copy 2)
    loopback_tcp_gb_per_s (tcp) the same bytes through one plain blocking loopback TCP connection
                        between two threads of this process: the ceiling any tcp backend has here

    kvrelay bench transfer --backend shm tcp --json --out loadtest/results/transfer_cpu.json

A backend that cannot run here (no GPU, cuda-python or NIXL) prints "not available here: <why>"
and the command exits 2.

``--ttft`` instead runs the end-to-end split on real vLLM (``bench_ttft.py``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvrelay.schemas.messages import KVDescriptor, KVLayout
from kvrelay.transport.kv.base import BlockTarget, host_identity
from kvrelay.transport.kv.fetch import available, make_reader
from kvrelay.transport.kv.region import block_nbytes

BACKENDS = ("shm", "cma", "tcp", "cuda-ipc", "nixl")
TOKENS = (512, 4096, 16384)
REPEATS = {512: 40, 4096: 15, 16384: 7}
WARMUP = 2
TICKET = 7_000_001
BLOCK_SIZE = 32


def layout(dtype: str) -> KVLayout:
    heads, dim = 3, 64
    return KVLayout(num_layers=30, num_kv_heads=heads, head_dim=dim, block_size=BLOCK_SIZE, dtype=dtype,
                    page_elems=heads * BLOCK_SIZE * 2 * dim)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay bench transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=["shm"])
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=0, help="reads per size (0: 40 / 15 / 7 by size)")
    p.add_argument("--checksum", action="store_true", help="verify a crc32 on every read")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    p.add_argument("--ttft", action="store_true", help="the end-to-end TTFT split on vLLM (bench_ttft.py)")
    return p


# --- the exporter process ---------------------------------------------------------------------


def _exporter(conn: Any, backend: str, lay_map: dict[str, Any], num_blocks: int, want_crc: bool) -> None:
    """Holds the blocks and serves them until told to stop; talks JSON over ``conn``."""
    import asyncio

    from kvrelay.transport.kv.copy import checksum

    lay = KVLayout.from_mapping(lay_map)
    torch.manual_seed(0)
    if backend == "cuda-ipc":
        from kvrelay.transport.kv.cuda_ipc import CudaExportRegion

        region: Any = CudaExportRegion(lay, num_blocks)
        region.data.copy_(torch.randn(region.data.shape, device="cuda").to(region.data.dtype))
    else:
        from kvrelay.transport.kv.region import ExportRegion, new_region_name

        region = ExportRegion.create(new_region_name(), lay, num_blocks)
        region.data.copy_(torch.randn(region.data.shape).to(region.data.dtype))
    region.set_tickets(list(range(num_blocks)), TICKET)
    crcs = {}
    if want_crc and backend != "cuda-ipc":
        crcs = {str(n): checksum(region.data, list(range(n))) for n in range(1, num_blocks + 1)
                if n in {-(-t // BLOCK_SIZE) for t in TOKENS} or n == num_blocks}
    info: dict[str, Any] = {"region": region.name, "endpoint": "", "crcs": crcs}

    async def serve() -> None:
        server = exporter = None
        if backend == "tcp":
            from kvrelay.transport.kv.tcp_server import BlockServer

            server = BlockServer([region])
            info["endpoint"] = await server.start()
        if backend == "nixl":
            from kvrelay.transport.kv.nixl import NixlExporter

            exporter = NixlExporter(region, agent_name=f"kvrelay-bench-{os.getpid()}")
            info["region"] = exporter.name
        conn.send_bytes(json.dumps(info).encode())
        await asyncio.get_running_loop().run_in_executor(None, conn.recv_bytes)  # "stop"
        if server is not None:
            await server.close()
        if exporter is not None:
            exporter.close()

    try:
        asyncio.run(serve())
    finally:
        region.close()


# --- the reader (this process) ----------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _cache(lay: KVLayout, num_blocks: int, device: str) -> BlockTarget:
    """A pre-faulted cache laid out like vLLM's CPU cache: layer-major, seen block-major."""
    dtype = torch.empty(0, dtype=getattr(torch, lay.dtype)).dtype
    flat = torch.zeros(lay.num_layers * num_blocks * lay.page_elems, dtype=dtype, device=device)
    kv = torch.as_strided(flat, (num_blocks, lay.num_layers, lay.page_elems),
                          (lay.page_elems, num_blocks * lay.page_elems, 1))
    return BlockTarget(kv=kv, layout=lay)


def _timed(fn: Any, repeats: int, sync: Any = None) -> list[float]:
    for _ in range(WARMUP):
        fn()
    out = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


def _paired(read: Any, copy: Any, repeats: int, sync: Any = None) -> tuple[list[float], list[float]]:
    """Times of ``read`` and of ``copy``, alternated, so both see the same machine load."""
    reads: list[float] = []
    copies: list[float] = []
    for i in range(WARMUP + repeats):
        for fn, out in ((read, reads), (copy, copies)):
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            if i >= WARMUP:
                out.append(time.perf_counter() - t0)
    return reads, copies


def _loopback_tcp(nbytes: int, repeats: int) -> float:
    """GB/s of ``nbytes`` through a plain blocking loopback TCP connection (sendall -> recv_into)."""
    import socket
    import threading

    src = torch.ones(nbytes, dtype=torch.uint8).numpy()
    dst = memoryview(torch.zeros(nbytes, dtype=torch.uint8).numpy()).cast("B")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        rx = socket.create_connection(srv.getsockname())
        tx, _ = srv.accept()
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.settimeout(120)

    def once() -> None:
        sender = threading.Thread(target=tx.sendall, args=(memoryview(src),))
        sender.start()
        got = 0
        while got < nbytes:
            got += rx.recv_into(dst[got:])
        sender.join(120)

    try:
        times = _timed(once, repeats)
    finally:
        tx.close()
        rx.close()
    return nbytes / statistics.median(times) / 1e9


def _export_copy(lay: KVLayout, n: int, repeats: int) -> float:
    """GB/s of the prefill side's copy of ``n`` blocks from a layer-major cache into a region."""
    from kvrelay.transport.kv.copy import copy_blocks
    from kvrelay.transport.kv.region import ExportRegion, new_region_name

    cache = _cache(lay, n + 8, "cpu")
    cache.kv.copy_(torch.randn(cache.kv.shape).to(cache.kv.dtype))
    with ExportRegion.create(new_region_name(), lay, n) as region:
        ids = list(range(n))
        times = _timed(lambda: copy_blocks(cache.kv, [i + 8 for i in ids], region.data, ids), repeats)
    return n * block_nbytes(lay) / statistics.median(times) / 1e9


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    lay = layout(args.dtype)
    num_blocks = max(-(-t // BLOCK_SIZE) for t in args.tokens)
    device = "cuda" if backend == "cuda-ipc" else "cpu"
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(
        target=_exporter, args=(child, backend, lay.to_mapping(), num_blocks, args.checksum), daemon=True
    )
    proc.start()
    try:
        if not parent.poll(300):
            raise RuntimeError("the exporter process did not start in 300 s")
        info = json.loads(parent.recv_bytes())
        reader = make_reader(backend)
        rows = []
        for tokens in args.tokens:
            rows.append(_measure(backend, reader, info, lay, tokens, device, args))
        reader.close()
    finally:
        if proc.is_alive():
            parent.send_bytes(b"stop")
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    return {"backend": backend, "results": rows}


def _measure(backend: str, reader: Any, info: dict[str, Any], lay: KVLayout, tokens: int, device: str,
             args: argparse.Namespace) -> dict[str, Any]:
    n = -(-tokens // BLOCK_SIZE)
    repeats = args.repeats or REPEATS.get(tokens, 7)
    desc = KVDescriptor(
        backend="shm" if backend == "cma" else backend, worker_id="bench", host=host_identity(),
        region=info["region"], block_ids=list(range(n)), num_tokens=tokens, ticket=TICKET,
        lease_expires_ms=int(time.time() * 1000) + 3_600_000, layout=lay, endpoint=info["endpoint"],
        checksum=info["crcs"].get(str(n)),
    )
    target = _cache(lay, n + 8, device)
    dst = list(range(8, n + 8))
    sync = torch.cuda.synchronize if device == "cuda" else None
    nbytes = n * block_nbytes(lay)
    # the baseline: one plain copy of the same bytes between two pre-faulted buffers, this process
    a = torch.ones(nbytes, dtype=torch.uint8, device=device)
    b = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    times, copies = _paired(lambda: reader.read(desc, target, dst, timeout_s=120), lambda: b.copy_(a),
                            repeats, sync)
    gbps = nbytes / statistics.median(times) / 1e9
    base = nbytes / statistics.median(copies) / 1e9
    row = {
        "tokens": tokens, "blocks": n, "bytes": nbytes, "repeats": repeats,
        "gb_per_s": round(gbps, 3),
        "p50_ms": round(statistics.median(times) * 1000, 3),
        "p99_ms": round(_pct(times, 0.99) * 1000, 3),
        "baseline_gb_per_s": round(base, 3),
        "ratio": round(gbps / base, 3),
    }
    if device == "cpu":
        row["export_copy_gb_per_s"] = round(_export_copy(lay, n, repeats), 3)
    if backend == "tcp":
        row["loopback_tcp_gb_per_s"] = round(_loopback_tcp(nbytes, repeats), 3)
    return row


def _machine(devices: set[str]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "kernel": platform.release(),
    }
    if "cuda" in devices and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--ttft" in argv:  # the vLLM split has options of its own
        from kvrelay.loadtest import bench_ttft

        return bench_ttft.main([a for a in argv if a != "--ttft"])
    args = _parser().parse_args(argv)
    for b in args.backend:
        ok, why = available(b)
        if not ok:
            print(f"kvrelay bench transfer: {b} not available here: {why}", file=sys.stderr)
            return 2
    report: dict[str, Any] = {
        "benchmark": "kv_transfer.backends",
        "layout": layout(args.dtype).to_mapping(),
        "checksum": args.checksum,
        "destination": "vLLM-like layer-major cache, pre-faulted, in the reader process",
        "machine": _machine({"cuda" if b == "cuda-ipc" else "cpu" for b in args.backend}),
        "backends": [run_backend(b, args) for b in args.backend],
    }
    text = json.dumps(report, indent=2)
    if args.json:
        print(text)
    else:
        for b in report["backends"]:
            for r in b["results"]:
                print(f"{b['backend']:>8} {r['tokens']:>6} tok  {r['gb_per_s']:7.2f} GB/s"
                      f"  p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms"
                      f"  baseline {r['baseline_gb_per_s']:6.2f} GB/s  ratio {r['ratio']:.2f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
