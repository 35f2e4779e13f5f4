"""``kvrelay bench <name> ...``: every benchmark, imported only when it runs.

Adding one is one line in ``BENCHES``: the name, the module under ``kvrelay.loadtest`` that
has ``main(argv) -> int``, and a one-line description.
"""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, tuple[str, str]] = {
    "router": ("kvrelay.loadtest.bench_router", "prefix index + kv-aware decision, vs Dynamo's RadixTree"),
    "routing": ("kvrelay.loadtest.bench_routing", "routing policies on simulated prefill workers (prefill tokens, TTFT)"),
    "run": ("kvrelay.loadtest.run", "drive a running deployment (HTTP or NATS): TTFT, ITL, throughput, goodput"),
    "compare": ("kvrelay.loadtest.compare", "start aggregated and disaggregated deployments, same workload, one report"),
    "sessions": ("kvrelay.loadtest.sessions_bench", "multi-step agents on real engines: KV transfer vs local prefill on the decode worker"),
    "agent": ("kvrelay.loadtest.bench_agent", "tool-calling agents through the openai client: per-step TTFT, cached share, valid calls"),
    "project": ("kvrelay.loadtest.project", "scale projection on simulated GPU clusters (cost model, virtual clock)"),
    "transfer": ("kvrelay.loadtest.bench_transfer", "KV transfer backends between two processes vs a memcpy (--ttft: vLLM split)"),
    "steps": ("kvrelay.loadtest.bench_steps", "engine decode-step and prefill times per dtype on this CPU (which dtype to serve)"),
    "kernels": ("kvrelay.loadtest.bench_kernels", "KV block gather/scatter kernels vs a memcpy"),
    "codec": ("kvrelay.loadtest.bench_codec", "bus message pack/unpack per message type (envelope + validation)"),
    "tenants": ("kvrelay.loadtest.bench_tenants", "fair vs fifo admission under a flooding tenant (sim engine): light TTFT, token shares"),
}


def _usage() -> str:
    lines = ["usage: kvrelay bench <name> [options]   (kvrelay bench <name> --help)", "", "benchmarks:"]
    lines += [f"  {name:<12} {desc}" for name, (_, desc) in sorted(BENCHES.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    entry = BENCHES.get(args[0])
    if entry is None:
        print(f"kvrelay bench: unknown benchmark {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(entry[0]).main(args[1:]))


if __name__ == "__main__":
    sys.exit(main())
