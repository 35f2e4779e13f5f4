"""Seeded, reproducible workloads: sessions of requests with token ids, tenants, arrivals and pauses.

A *session* is one conversation (or agent run, or document Q&A) kept as one growing token
stream: each step's prompt is a prefix of the stream and its output follows it, so step i+1's
prompt extends step i's prompt and output exactly (what prefix caching can reuse):

    multiturn  [system][user 1][answer 1][user 2][answer 2] ...          user think time between turns
    agentic    [system + tools][task][call 1][tool result 1][call 2] ... a tool pause between steps
    cot        [system][question][long reasoning]                         short prompt, long output
    longdoc    [system][document][question 1][answer 1][question 2] ...  popular documents shared

System prompts (and documents) come from per-tenant pools with Zipf-like popularity, so sessions of
a tenant share them. Session starts are a Poisson process: unit-rate arrival times divided by
``rate`` (``Workload.with_rate`` rescales without regenerating anything). Later steps wait for the
previous step to finish plus their ``delay_s`` (think time or tool pause): clients close the loop.

Every session is generated from its own seed ``(seed, workload, index)``, so the first sessions
are the same whatever the count, and a seed always gives the same requests.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import numpy as np

VOCAB = 49152
KINDS = ("multiturn", "agentic", "cot", "longdoc")
_KIND_ID = {k: i + 1 for i, k in enumerate(KINDS)}
Range = tuple[int, int]
FRange = tuple[float, float]


class WorkloadError(ValueError):
    """A workload config or name is invalid."""


def _check_ranges(cfg: object) -> None:
    for f in fields(cfg):  # type: ignore[arg-type]
        v = getattr(cfg, f.name)
        if isinstance(v, tuple):
            if len(v) != 2 or not 0 <= v[0] <= v[1]:
                raise WorkloadError(f"{type(cfg).__name__}.{f.name}: need 0 <= low <= high, got {v!r}")
        elif isinstance(v, (int, float)) and v < (1 if f.name in ("sessions", "tenants", "pool") else 0):
            raise WorkloadError(f"{type(cfg).__name__}.{f.name}: {v!r} is too small")


@dataclass(frozen=True)
class MultiturnConfig:
    sessions: int = 400
    tenants: int = 4
    pool: int = 4  # system prompts per tenant
    system_tokens: Range = (500, 2000)
    turns: Range = (2, 10)
    user_tokens: Range = (20, 300)
    output_tokens: Range = (50, 500)
    think_s: FRange = (3.0, 30.0)

    def __post_init__(self) -> None:
        _check_ranges(self)


@dataclass(frozen=True)
class AgenticConfig:
    sessions: int = 200
    tenants: int = 4
    pool: int = 2  # agent definitions (system prompt + tool schemas) per tenant
    system_tokens: Range = (1500, 4000)
    task_tokens: Range = (100, 600)
    steps: Range = (4, 20)
    output_tokens: Range = (30, 200)  # the model's tool call
    tool_result_tokens: Range = (200, 800)
    tool_pause_s: FRange = (0.2, 5.0)

    def __post_init__(self) -> None:
        _check_ranges(self)


@dataclass(frozen=True)
class CotConfig:
    sessions: int = 1000
    tenants: int = 4
    pool: int = 2
    system_tokens: Range = (100, 400)
    question_tokens: Range = (20, 200)
    output_tokens: Range = (1000, 4000)

    def __post_init__(self) -> None:
        _check_ranges(self)


@dataclass(frozen=True)
class LongdocConfig:
    sessions: int = 600
    tenants: int = 2
    pool: int = 16  # documents per tenant
    system_tokens: Range = (200, 600)
    doc_tokens: Range = (8000, 32000)
    questions: Range = (1, 3)
    question_tokens: Range = (10, 100)
    output_tokens: Range = (50, 400)
    think_s: FRange = (5.0, 30.0)

    def __post_init__(self) -> None:
        _check_ranges(self)


@dataclass(frozen=True)
class MixConfig:
    """Sessions of every kind, interleaved; ``weights`` are shares of sessions."""

    sessions: int = 600
    weights: dict[str, float] = field(default_factory=lambda: {"multiturn": 0.4, "agentic": 0.3, "cot": 0.2,
                                                               "longdoc": 0.1})

    def __post_init__(self) -> None:
        bad = set(self.weights) - set(KINDS)
        shares = self.weights.values()
        if bad or not self.weights or any(w < 0 for w in shares) or not sum(shares):
            raise WorkloadError(f"MixConfig.weights: positive shares of {KINDS} needed, got {self.weights!r}")
        if self.sessions < 1:
            raise WorkloadError("MixConfig.sessions must be >= 1")


CONFIGS = {"multiturn": MultiturnConfig, "agentic": AgenticConfig, "cot": CotConfig, "longdoc": LongdocConfig,
           "mix": MixConfig}


@dataclass(frozen=True)
class Step:
    prompt_len: int  # this step's prompt is the session's tokens[:prompt_len]
    output_len: int  # its output is the next output_len tokens of the session
    delay_s: float  # step 0: 0 (the session's start); later: after the previous step finishes
    delay_kind: Literal["start", "think", "tool"]


@dataclass
class Session:
    session_id: str
    kind: str
    tenant: str
    start_unit: float  # arrival time at rate 1 session/s
    tokens: array  # array('I'): the whole stream, prompts and outputs
    steps: list[Step]

    def prompt(self, i: int) -> array:
        return self.tokens[: self.steps[i].prompt_len]

    def output(self, i: int) -> array:
        s = self.steps[i]
        return self.tokens[s.prompt_len: s.prompt_len + s.output_len]


@dataclass(frozen=True)
class Request:
    """One step of a session, as a client sends it."""

    request_id: str
    session_id: str
    tenant: str
    step: int
    prompt: array
    output_len: int
    start_s: float  # when the session starts (the same for every step of it)
    delay_s: float
    delay_kind: str


@dataclass
class Workload:
    kind: str
    seed: int
    sessions: list[Session]  # by start time
    rate: float = 1.0  # sessions per second

    def with_rate(self, rate: float) -> Workload:
        if not rate > 0:
            raise WorkloadError(f"rate must be > 0, got {rate!r}")
        return replace(self, rate=rate)

    def start_s(self, session: Session) -> float:
        return session.start_unit / self.rate

    @property
    def num_requests(self) -> int:
        return sum(len(s.steps) for s in self.sessions)

    @property
    def prompt_tokens(self) -> int:
        return sum(st.prompt_len for s in self.sessions for st in s.steps)

    def requests(self) -> Iterator[Request]:
        """Every step of every session, sessions by start time (later steps wait on earlier ones)."""
        for s in self.sessions:
            for i, st in enumerate(s.steps):
                yield Request(f"{s.session_id}-{i}", s.session_id, s.tenant, i, s.prompt(i), st.output_len,
                              self.start_s(s), st.delay_s, st.delay_kind)


class _Gen:
    """Token and number draws of one session, from its own seed."""

    def __init__(self, *key: int) -> None:
        self.rng = np.random.default_rng(list(key))

    def n(self, r: Range) -> int:
        return int(self.rng.integers(r[0], r[1] + 1))

    def f(self, r: FRange) -> float:
        return float(self.rng.uniform(r[0], r[1]))

    def tokens(self, n: int) -> array:
        out = array("I")
        out.frombytes(self.rng.integers(0, VOCAB, n, dtype=np.uint32).astype("<u4").tobytes())
        return out

    def zipf(self, n: int) -> int:
        w = 1.0 / np.arange(1, n + 1)
        return int(self.rng.choice(n, p=w / w.sum()))


class _Pools:
    """Per-tenant shared prefixes (system prompts, documents), generated on first use."""

    def __init__(self, seed: int, kind: str) -> None:
        self.seed, self.kid, self._cache = seed, _KIND_ID[kind], {}

    def get(self, what: int, tenant: int, k: int, r: Range) -> array:
        key = (what, tenant, k)
        if key not in self._cache:
            g = _Gen(self.seed, self.kid, 1_000_000 + what, tenant, k)
            self._cache[key] = g.tokens(g.n(r))
        return self._cache[key]


def _multiturn(cfg: MultiturnConfig, g: _Gen, pools: _Pools, tenant: int) -> tuple[array, list[Step]]:
    toks = array("I", pools.get(0, tenant, g.zipf(cfg.pool), cfg.system_tokens))
    steps = []
    for t in range(g.n(cfg.turns)):
        toks += g.tokens(g.n(cfg.user_tokens))
        out = g.n(cfg.output_tokens)
        steps.append(Step(len(toks), out, g.f(cfg.think_s) if t else 0.0, "think" if t else "start"))
        toks += g.tokens(out)
    return toks, steps


def _agentic(cfg: AgenticConfig, g: _Gen, pools: _Pools, tenant: int) -> tuple[array, list[Step]]:
    toks = array("I", pools.get(0, tenant, g.zipf(cfg.pool), cfg.system_tokens))
    toks += g.tokens(g.n(cfg.task_tokens))
    steps = []
    for t in range(g.n(cfg.steps)):
        if t:
            toks += g.tokens(g.n(cfg.tool_result_tokens))
        out = g.n(cfg.output_tokens)
        steps.append(Step(len(toks), out, g.f(cfg.tool_pause_s) if t else 0.0, "tool" if t else "start"))
        toks += g.tokens(out)
    return toks, steps


def _cot(cfg: CotConfig, g: _Gen, pools: _Pools, tenant: int) -> tuple[array, list[Step]]:
    toks = array("I", pools.get(0, tenant, g.zipf(cfg.pool), cfg.system_tokens))
    toks += g.tokens(g.n(cfg.question_tokens))
    out = g.n(cfg.output_tokens)
    steps = [Step(len(toks), out, 0.0, "start")]
    return toks + g.tokens(out), steps


def _longdoc(cfg: LongdocConfig, g: _Gen, pools: _Pools, tenant: int) -> tuple[array, list[Step]]:
    toks = array("I", pools.get(0, tenant, 0, cfg.system_tokens))
    toks += pools.get(1, tenant, g.zipf(cfg.pool), cfg.doc_tokens)
    steps = []
    for t in range(g.n(cfg.questions)):
        toks += g.tokens(g.n(cfg.question_tokens))
        out = g.n(cfg.output_tokens)
        steps.append(Step(len(toks), out, g.f(cfg.think_s) if t else 0.0, "think" if t else "start"))
        toks += g.tokens(out)
    return toks, steps


_BUILDERS = {"multiturn": _multiturn, "agentic": _agentic, "cot": _cot, "longdoc": _longdoc}


def _sessions(kind: str, cfg: object, seed: int, count: int, max_requests: int | None) -> list[Session]:
    pools, out, total = _Pools(seed, kind), [], 0
    # with max_requests, sessions until that many requests (every session has at least one)
    for i in range(count if max_requests is None else max_requests):
        if max_requests is not None and total >= max_requests:
            break
        g = _Gen(seed, _KIND_ID[kind], i)
        tenant = int(g.rng.integers(0, cfg.tenants))  # type: ignore[attr-defined]
        toks, steps = _BUILDERS[kind](cfg, g, pools, tenant)  # type: ignore[operator]
        if max_requests is not None:
            steps = steps[: max_requests - total]
        total += len(steps)
        out.append(Session(f"{kind[:2]}{seed}-{i}", kind, f"tenant-{tenant}", 0.0, toks, steps))
    return out


def _arrivals(sessions: list[Session], seed: int) -> list[Session]:
    gaps = np.random.default_rng([seed, 0, 7]).exponential(1.0, len(sessions))
    for s, t in zip(sessions, np.cumsum(gaps) - gaps[0]):
        s.start_unit = float(t)
    return sessions


def generate(kind: str, seed: int = 0, cfg: object | None = None,
             max_requests: int | None = None) -> Workload:
    """The sessions of workload ``kind`` (see ``KINDS`` and "mix").

    ``cfg.sessions`` sessions, or, when ``max_requests`` is given, as many sessions as make exactly
    ``max_requests`` requests (the last session cut short; ``cfg.sessions`` is then not used; a mix
    splits ``max_requests`` by its weights, rounded).
    """
    if kind not in CONFIGS:
        raise WorkloadError(f"unknown workload {kind!r}; known: {sorted(CONFIGS)}")
    cfg = cfg if cfg is not None else CONFIGS[kind]()
    if not isinstance(cfg, CONFIGS[kind]):
        raise WorkloadError(f"workload {kind!r} takes a {CONFIGS[kind].__name__}, got {type(cfg).__name__}")
    if max_requests is not None and max_requests < 1:
        raise WorkloadError("max_requests must be >= 1")
    if kind != "mix":
        sessions = _sessions(kind, cfg, seed, cfg.sessions, max_requests)  # type: ignore[attr-defined]
        return Workload(kind, seed, _arrivals(sessions, seed))
    total_w = sum(cfg.weights.values())  # type: ignore[attr-defined]
    parts = []
    for k, w in sorted(cfg.weights.items()):  # type: ignore[attr-defined]
        n = round(cfg.sessions * w / total_w)  # type: ignore[attr-defined]
        cap = None if max_requests is None else round(max_requests * w / total_w)
        if (n if cap is None else cap) > 0:
            parts += _sessions(k, CONFIGS[k](), seed, n, cap)
    order = np.random.default_rng([seed, 0, 9]).permutation(len(parts))
    return Workload(kind, seed, _arrivals([parts[i] for i in order], seed))
