"""Benchmark metrics, pure: per-request records in, latency percentiles and rates out.

Definitions (every figure kvrelay's load tests report is computed here):

- A request's *token arrivals* are the arrival times of the stream chunks that carry output
  tokens; a chunk carrying k tokens counts as k tokens arriving together (its time, k times).
  Over HTTP a server-sent event carries text, not a token count: each non-empty content event
  counts as one token (vLLM and kvrelay send one event per engine step, one token per request
  and step); the total comes from the final ``usage`` when the server sends it.
- **TTFT** (time to first token): first token arrival - the request's *scheduled* send time (an
  open-loop client that falls behind still charges the delay to the server's latency: no
  coordinated omission).
- **ITL** (inter-token latency): the gaps between consecutive token arrivals after the first,
  pooled over all requests (a chunk of k tokens gives one gap then k - 1 zero gaps). Percentiles
  of ITL are over tokens, so a long stall shows in the p99 however few requests it hits.
- **TPOT** (time per output token) of one request: (last token arrival - first token arrival)
  / (output tokens - 1), the request's mean ITL; undefined for one-token outputs.
- **E2E latency**: last token arrival (or the error) - scheduled send time.
- **Goodput**: the share of all requests sent that succeeded with TTFT <= ``slo.ttft_ms`` and
  TPOT <= ``slo.itl_ms`` (and E2E <= ``slo.e2e_ms`` when set); a failed request never meets it.
  This is the per-request SLO attainment of DistServe (Zhong et al., OSDI 2024, section 2:
  "the proportion of requests that meet the TTFT and TPOT SLOs") and of vLLM's serving benchmark
  (``benchmark_serving.py --goodput ttft:<ms> tpot:<ms>``, which compares each request's TTFT
  and mean TPOT with the limits). ``goodput_req_per_s`` is those requests per second of wall time.
- **Throughput**: output tokens of successful requests / wall time (first scheduled send to the
  last completion); requests/s likewise.

Percentiles come from HDR histograms (``hdrhistogram``): values in microseconds from 1 µs to
1 h at 3 significant digits. A percentile p of N values is the value at rank
``max(1, floor(p/100 * N + 0.5))`` in sorted order (hdrhistogram's rule), reported as the top
of its histogram bucket: at most 0.1 % above the exact value. Values above 1 h are clamped and
counted (``clamped``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

US_PER_MS = 1000.0
MAX_US = 3_600_000_000  # 1 hour
SIG_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class Histogram:
    """An HDR histogram of latencies in milliseconds (stored as integer microseconds)."""

    def __init__(self) -> None:
        self._h = HdrHistogram(1, MAX_US, SIG_DIGITS)
        self.clamped = 0
        self._sum_ms = 0.0

    def record_ms(self, value_ms: float, count: int = 1) -> None:
        if value_ms < 0:
            raise ValueError(f"latency must be >= 0, got {value_ms!r} ms")
        us = int(round(value_ms * US_PER_MS))
        if us > MAX_US:
            us, self.clamped = MAX_US, self.clamped + count
        self._h.record_value(us, count)
        self._sum_ms += value_ms * count

    @property
    def count(self) -> int:
        return int(self._h.total_count)

    def percentile_ms(self, p: float) -> float | None:
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {p!r}")
        if self.count == 0:
            return None
        return self._h.get_value_at_percentile(p) / US_PER_MS

    def mean_ms(self) -> float | None:
        return self._sum_ms / self.count if self.count else None

    def max_ms(self) -> float | None:
        return self._h.get_max_value() / US_PER_MS if self.count else None

    def summary(self, prefix: str, percentiles: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
        out: dict[str, float | None] = {f"{prefix}_p{_pname(p)}": _r(self.percentile_ms(p))
                                        for p in percentiles}
        out[f"{prefix}_mean"] = _r(self.mean_ms())
        out[f"{prefix}_max"] = _r(self.max_ms())
        return out


def _pname(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p).replace(".", "_")


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class RequestRecord:
    """What a client saw of one request. Times are seconds on one monotonic clock."""

    request_id: str
    scheduled_s: float  # when the arrival process wanted it sent (latencies start here)
    sent_s: float = 0.0  # when it was really sent (later than scheduled if the client fell behind)
    kind: str = ""  # the workload's label for it ("cot", "longdoc", "trace", ...)
    prompt_tokens: int = 0  # what the client sent (the server's usage overrides when it reports one)
    max_tokens: int = 0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens in it)
    usage_output_tokens: int | None = None  # from the server's final usage
    cached_tokens: int | None = None
    end_s: float | None = None  # stream end (last chunk, error or timeout)
    error: str | None = None  # the error's kind: "http_429", "timeout", "connection", "stream_error", ...
    error_detail: str = ""
    retries: int = 0  # times the server pushed back (HTTP 429) before it took the request

    @property
    def ok(self) -> bool:
        return self.error is None

    def token_times(self) -> list[float]:
        """One arrival time per output token (a chunk of k tokens gives its time k times)."""
        out: list[float] = []
        for t, n in self.chunks:
            if n < 0:
                raise ValueError(f"{self.request_id}: a chunk cannot carry {n} tokens")
            out.extend([t] * n)
        return out

    @property
    def output_tokens(self) -> int:
        """The server's usage count when it sent one, else the tokens counted in chunks."""
        if self.usage_output_tokens is not None:
            return self.usage_output_tokens
        return sum(n for _, n in self.chunks)

    def first_token_s(self) -> float | None:
        return next((t for t, n in self.chunks if n > 0), None)

    def last_token_s(self) -> float | None:
        return next((t for t, n in reversed(self.chunks) if n > 0), None)

    def ttft_ms(self) -> float | None:
        first = self.first_token_s()
        return None if first is None else (first - self.scheduled_s) * 1e3

    def itls_ms(self) -> list[float]:
        times = self.token_times()
        return [(b - a) * 1e3 for a, b in zip(times, times[1:])]

    def tpot_ms(self) -> float | None:
        first, last, n = self.first_token_s(), self.last_token_s(), self.output_tokens
        if first is None or last is None or n < 2:
            return None
        return (last - first) * 1e3 / (n - 1)

    def e2e_ms(self) -> float | None:
        end = self.last_token_s() if self.ok else None
        if end is None:
            end = self.end_s
        return None if end is None else (end - self.scheduled_s) * 1e3


@dataclass(frozen=True)
class SLO:
    """Per-request service levels (milliseconds); None = no limit on that figure."""

    ttft_ms: float | None = None
    itl_ms: float | None = None  # compared with the request's TPOT (mean inter-token latency)
    e2e_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "itl_ms", "e2e_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"SLO {name} must be > 0, got {v!r}")

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        ttft = r.ttft_ms()
        if ttft is None:
            return False
        if self.ttft_ms is not None and ttft > self.ttft_ms:
            return False
        tpot = r.tpot_ms()
        if self.itl_ms is not None and tpot is not None and tpot > self.itl_ms:
            return False
        e2e = r.e2e_ms()
        return self.e2e_ms is None or (e2e is not None and e2e <= self.e2e_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_ms": self.ttft_ms, "itl_ms": self.itl_ms, "e2e_ms": self.e2e_ms,
                "definition": "request succeeded, TTFT <= ttft_ms, TPOT (mean ITL) <= itl_ms, E2E <= e2e_ms"}


def goodput(records: Sequence[RequestRecord], slo: SLO) -> float | None:
    """The share of requests (failed ones included) meeting the SLO; None when there are none."""
    if not records:
        return None
    return sum(1 for r in records if slo.met(r)) / len(records)


def wall_s(records: Sequence[RequestRecord]) -> float:
    """First scheduled send to the last stream end (0 for no records)."""
    if not records:
        return 0.0
    start = min(r.scheduled_s for r in records)
    ends = [e for r in records for e in (r.end_s, r.last_token_s()) if e is not None]
    return max(ends, default=start) - start


def errors_by_kind(records: Iterable[RequestRecord]) -> dict[str, int]:
    return dict(sorted(Counter(r.error for r in records if r.error is not None).items()))


def histograms(records: Iterable[RequestRecord]) -> dict[str, Histogram]:
    """TTFT, ITL (pooled over tokens), TPOT and E2E of the successful requests."""
    h = {k: Histogram() for k in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms")}
    for r in records:
        if not r.ok:
            continue
        for key, value in (("ttft_ms", r.ttft_ms()), ("tpot_ms", r.tpot_ms()), ("e2e_ms", r.e2e_ms())):
            if value is not None:
                h[key].record_ms(value)
        for gap in r.itls_ms():
            h["itl_ms"].record_ms(gap)
    return h


def summarize(records: Sequence[RequestRecord], slo: SLO, duration_s: float | None = None) -> dict[str, Any]:
    """The result block of one run: counts, latency percentiles, rates, goodput, errors."""
    wall = duration_s if duration_s is not None else wall_s(records)
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    out: dict[str, Any] = {
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "errors": errors_by_kind(records), "retries_429": sum(r.retries for r in records),
        "duration_s": round(wall, 3),
        "input_tokens": in_tokens, "output_tokens": out_tokens,
    }
    for key, h in histograms(records).items():
        out.update(h.summary(key))
        out[f"{key}_count"] = h.count
    out["output_tok_per_s"] = round(out_tokens / wall, 3) if wall > 0 else None
    out["input_tok_per_s"] = round(in_tokens / wall, 3) if wall > 0 else None
    out["req_per_s"] = round(len(ok) / wall, 4) if wall > 0 else None
    g = goodput(records, slo)
    out["goodput"] = None if g is None else round(g, 4)
    met = sum(1 for r in records if slo.met(r))
    out["goodput_req_per_s"] = round(met / wall, 4) if wall > 0 else None
    out["slo"] = slo.to_dict()
    return out


def throughput_timeline(records: Iterable[RequestRecord], bin_s: float = 1.0
                        ) -> list[tuple[float, float, float]]:
    """(bin start s from the first send, output tokens/s, completed requests/s) per time bin."""
    if not bin_s > 0:
        raise ValueError("bin_s must be > 0")
    recs = list(records)
    if not recs:
        return []
    t0 = min(r.scheduled_s for r in recs)
    toks: Counter[int] = Counter()
    done: Counter[int] = Counter()
    for r in recs:
        for t, n in r.chunks:
            toks[int((t - t0) // bin_s)] += n
        if r.ok and r.end_s is not None:
            done[int((r.end_s - t0) // bin_s)] += 1
    last = max([*toks, *done], default=0)
    return [(i * bin_s, toks[i] / bin_s, done[i] / bin_s) for i in range(last + 1)]
