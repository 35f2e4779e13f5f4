"""What a benchmark sends: sessions of requests with token-id prompts, from a workload or a trace.

A ``SessionPlan`` is a list of ``BenchRequest`` steps sent one after the other (a step waits for
the previous one to finish, then its ``delay_s``); ``start_s`` is when the session starts in an
open-loop run (Poisson or trace replay). Prompts are token ids, sent as such (``/v1/completions``
with a token-id prompt, or ``ClientRequest.prompt_token_ids`` on NATS), so prompt lengths and
shared prefixes are exact. Outputs are forced to ``max_tokens`` (``ignore_eos``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kvrelay.loadtest.trace import TraceRecord, TraceTokens
from kvrelay.loadtest.workloads import Workload


class PlanError(ValueError):
    """A plan cannot be built as asked (nothing fits the context, bad limits)."""


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    tenant: str = "default"
    kind: str = ""
    delay_s: float = 0.0  # after the previous step of its session finished (0 for a first step)
    session_id: str = ""  # the session it belongs to (sent only by clients told to: ``sessions=True``)


@dataclass
class SessionPlan:
    session_id: str
    start_s: float  # open-loop start offset from the run's start
    steps: list[BenchRequest] = field(default_factory=list)


@dataclass
class Fit:
    """Shortens prompts so prompt + output fits ``max_context`` (keeps the prompt's head)."""

    max_context: int | None = None
    truncated: int = 0  # prompts shortened
    dropped: int = 0  # requests whose output alone does not fit

    def __call__(self, prompt: list[int], max_tokens: int) -> list[int] | None:
        if self.max_context is None:
            return prompt
        room = self.max_context - max_tokens
        if room < 1:
            self.dropped += 1
            return None
        if len(prompt) > room:
            self.truncated += 1
            return prompt[:room]
        return prompt


def from_workload(wl: Workload, fit: Fit | None = None, max_output: int | None = None) -> list[SessionPlan]:
    """The workload's sessions in start order; ``max_output`` caps output lengths."""
    fit = fit or Fit()
    out: list[SessionPlan] = []
    for s in wl.sessions:
        plan = SessionPlan(s.session_id, wl.start_s(s))
        for i, st in enumerate(s.steps):
            max_tokens = st.output_len if max_output is None else min(st.output_len, max_output)
            prompt = fit(list(s.prompt(i)), max(1, max_tokens))
            if prompt is None:
                break  # later steps are longer still
            plan.steps.append(BenchRequest(f"{s.session_id}-{i}", prompt, max(1, max_tokens), s.tenant,
                                           s.kind, st.delay_s if i else 0.0, s.session_id))
        if plan.steps:
            out.append(plan)
    if not out:
        raise PlanError("no request of the workload fits the context")
    return out


def from_trace(records: Iterable[TraceRecord], tokens: TraceTokens, speedup: float = 1.0,
               fit: Fit | None = None, max_output: int | None = None,
               tenant: str = "default") -> list[SessionPlan]:
    """One single-step session per trace line, starting at its timestamp / ``speedup``."""
    if not speedup > 0:
        raise PlanError(f"speedup must be > 0, got {speedup!r}")
    fit = fit or Fit()
    out: list[SessionPlan] = []
    for rec in records:
        max_tokens = rec.output_length if max_output is None else min(rec.output_length, max_output)
        prompt = fit(tokens.prompt_tokens(rec), max_tokens)
        if prompt is None:
            continue
        req = BenchRequest(f"trace-{rec.line}", prompt, max_tokens, tenant, "trace")
        out.append(SessionPlan(f"trace-{rec.line}", rec.timestamp_ms / 1000.0 / speedup, [req]))
    if not out:
        raise PlanError("no request of the trace fits the context")
    return out


def with_starts(plans: list[SessionPlan], starts: list[float]) -> list[SessionPlan]:
    """The same sessions with new start offsets (e.g. a Poisson process of another rate)."""
    if len(starts) < len(plans):
        raise PlanError(f"{len(plans)} sessions but only {len(starts)} start times")
    return [SessionPlan(p.session_id, t, p.steps) for p, t in zip(plans, starts)]


def count_requests(plans: Iterable[SessionPlan]) -> int:
    return sum(len(p.steps) for p in plans)
