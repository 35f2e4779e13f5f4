"""``kvrelay bench codec``: pack and unpack per message, for the real bus message types.

Messages (fixed, seeded): a ``PrefillTask`` with a 2,048-token prompt, a ``TokenChunk`` of 4
tokens, a ``KvEventBatch`` of one 64-block stored event (packed hashes), a ``WorkerInfo`` and a
``ClientRequest`` of 4 chat messages. For each: the encoded size, ``pack`` (validation-free
encode, envelope included) and ``unpack`` (decode + full validation) in µs per message, the
median of ``--repeats`` runs of ``--number`` calls each. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from kvrelay.schemas.codec import Message, pack, unpack
from kvrelay.schemas.kv_events import KvEvent, KvEventBatch
from kvrelay.schemas.messages import ChatMessage, ClientRequest, PrefillTask, SamplingSpec, TokenChunk, WorkerInfo


def samples(seed: int = 0) -> dict[str, Message]:
    rng = random.Random(seed)
    sampling = SamplingSpec(max_tokens=256, temperature=0.7, top_p=0.9, stop=["\n\n"])
    chat = [ChatMessage(role=r, content=f"message {i}: " + "lorem ipsum " * 20)
            for i, r in enumerate(("system", "user", "assistant", "user"))]
    return {
        "PrefillTask": PrefillTask(
            request_id="req-0123456789", tenant="acme", prompt_token_ids=[rng.randrange(49152) for _ in range(2048)],
            sampling=sampling, stream_subject="kvrelay.default.stream.req-0123456789",
            deadline_ms=1_700_000_000_000, router_id="router-1", arrival_ms=1_699_999_999_000),
        "TokenChunk": TokenChunk(request_id="req-0123456789", seq=17, token_ids=[11, 22, 33, 44],
                                 text=" the quick", worker="decode-1", sent_ms=1_700_000_000_000),
        "KvEventBatch": KvEventBatch(
            worker_id="prefill-1", epoch=3, event_id=1234, spec="xxh64-chain-v1/bs=32/seed=abcd1234",
            events=[KvEvent.stored([rng.getrandbits(64) for _ in range(64)], parent=rng.getrandbits(64),
                                   num_tokens=2048)], sent_ms=1_700_000_000_000),
        "WorkerInfo": WorkerInfo(worker_id="decode-1", role="decode", model="smollm2", host="node-1", pid=4242,
                                 started_ms=1_700_000_000_000, heartbeat_ms=1_700_000_001_000, block_size=32,
                                 hash_seed="kvrelay-v1", backends=["shm", "tcp"], max_slots=8, active=3,
                                 free_kv_blocks=1000, max_model_len=4096),
        "ClientRequest": ClientRequest(request_id="req-0123456789", stream_subject="client.inbox.1", model="smollm2",
                                       messages=chat, sampling=sampling, session_id="agent-7"),
    }


def _time_us(fn: Callable[[], Any], number: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t0) / number * 1e6)
    return round(statistics.median(runs), 3)


def measure(number: int, repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, msg in samples().items():
        data = pack(msg)
        if unpack(data, type(msg)) != msg:
            raise AssertionError(f"{name} does not round-trip")
        cls = type(msg)
        out[name] = {
            "bytes": len(data),
            "pack_us": _time_us(lambda: pack(msg), number, repeats),
            "unpack_us": _time_us(lambda: unpack(data, cls), number, repeats),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvrelay bench codec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=2000, help="calls per timed run")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    result = {"bench": "codec", "python": platform.python_version(), "machine": platform.machine(),
              "number": args.number, "repeats": args.repeats, "messages": measure(args.number, args.repeats)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'message':<14} {'bytes':>7} {'pack µs':>9} {'unpack µs':>10}")
    for name, r in result["messages"].items():
        print(f"{name:<14} {r['bytes']:>7} {r['pack_us']:>9.2f} {r['unpack_us']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
