"""The interference workload: long prompts arriving while long outputs decode.

Two request streams run at once for ``duration_s`` (seconds of scheduling; requests in flight
then finish):

- ``decoders`` closed-loop users, each sending one request after the other: a short prompt
  (``decode_prompt`` tokens) and a long output (``decode_output`` tokens). They keep decode
  batches busy the whole run.
- long prompts (``long_prompt`` tokens, ``long_output`` output tokens) arriving as a Poisson
  process of ``long_rate`` per second, open loop. On an engine that prefills and decodes, each one
  stalls the decode steps of every stream on that engine (the interference disaggregation removes).

Every prompt is fresh random token ids (no shared prefixes: the prefix cache plays no part), all
drawn from ``seed``: the same seed gives the same requests to every deployment.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kvrelay.loadtest.arrivals import Driver, poisson_times
from kvrelay.loadtest.metrics import RequestRecord
from kvrelay.loadtest.plan import BenchRequest, SessionPlan

VOCAB = 49152


@dataclass(frozen=True)
class InterferenceWorkload:
    decoders: int = 8
    decode_prompt: tuple[int, int] = (64, 192)
    decode_output: tuple[int, int] = (200, 400)
    long_rate: float = 0.06  # long prompts per second
    long_prompt: tuple[int, int] = (1500, 3000)
    long_output: tuple[int, int] = (8, 16)
    duration_s: float = 180.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("decode_prompt", "decode_output", "long_prompt", "long_output"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}: need 1 <= low <= high, got {(lo, hi)}")
        if self.decoders < 0 or self.long_rate < 0 or not self.duration_s > 0:
            raise ValueError("decoders and long_rate must be >= 0 and duration_s > 0")
        if self.decoders == 0 and self.long_rate == 0:
            raise ValueError("the workload needs decoders or long prompts")

    def describe(self) -> dict[str, Any]:
        return asdict(self) | {"what": "closed-loop long-output streams + Poisson long prompts (see "
                                       "loadtest/interference.py)"}

    def _request(self, rng: np.random.Generator, rid: str, kind: str, prompt: tuple[int, int],
                 output: tuple[int, int]) -> BenchRequest:
        n = int(rng.integers(prompt[0], prompt[1] + 1))
        ids = rng.integers(0, VOCAB, n).tolist()
        return BenchRequest(rid, ids, int(rng.integers(output[0], output[1] + 1)), kind=kind)

    def decode_plans(self, max_requests: int | None = None) -> list[SessionPlan]:
        """Enough single-request sessions for the decoders to stay busy for the whole duration."""
        # a generous bound: a decode stream cannot beat 50 tokens/s per stream on these engines
        n = max_requests or self.decoders * max(1, math.ceil(self.duration_s * 50 / self.decode_output[0]))
        rng = np.random.default_rng([self.seed, 1])
        return [SessionPlan(f"dec{i}", 0.0, [self._request(rng, f"dec{i}", "decode", self.decode_prompt,
                                                            self.decode_output)]) for i in range(n)]

    def long_plans(self) -> list[SessionPlan]:
        if self.long_rate == 0:
            return []
        n = max(1, math.ceil(self.long_rate * self.duration_s * 2) + 10)
        starts = [t for t in poisson_times(n, self.long_rate, self.seed + 7) if t < self.duration_s]
        rng = np.random.default_rng([self.seed, 2])
        return [SessionPlan(f"long{i}", t, [self._request(rng, f"long{i}", "long_prompt", self.long_prompt,
                                                          self.long_output)]) for i, t in enumerate(starts)]


async def run(send: Any, wl: InterferenceWorkload, on_record: Any = None) -> tuple[list[RequestRecord], dict]:
    """Both streams at once through ``send``; the records and the drivers' counters."""
    dec = Driver(send, duration_s=wl.duration_s, on_record=on_record)
    lng = Driver(send, duration_s=wl.duration_s, on_record=on_record)
    jobs = []
    if wl.decoders:
        jobs.append(dec.run_closed(wl.decode_plans(), wl.decoders))
    if wl.long_rate:
        jobs.append(lng.run_open(wl.long_plans()))
    await asyncio.gather(*jobs)
    counters = {"scheduled": dec.scheduled + lng.scheduled, "late_sends": dec.late + lng.late}
    return dec.records + lng.records, counters


async def warmup(send: Any, n: int, seed: int = 99) -> list[RequestRecord]:
    """``n`` small requests one after the other (not measured): first-request costs are paid here."""
    rng = np.random.default_rng([seed, 3])
    out = []
    for i in range(n):
        req = BenchRequest(f"warmup{i}", rng.integers(0, VOCAB, 256).tolist(), 8, kind="warmup")
        out.append(await send(req, time.monotonic()))
    return out
