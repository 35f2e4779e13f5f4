"""A decode worker's budget for local prefills: admit one only while decode steps stay within an ITL
target. Pure and synchronous (no clock, no I/O); ``workers/local_prefill.py`` asks it.

A local prefill's prompt tokens are computed in the decode engine's steps, beside the streams
decoding there, and each of those tokens lengthens the step that carries it (the stall
disaggregation otherwise removes). With a per-token cost estimate the target gives a budget:

    step_tokens = floor((itl_target_ms - step_ms) / token_ms)     prompt tokens one step may carry

- The engine chunks prefill (``decode.prefill_chunk_tokens`` > 0, vLLM's ``max_num_batched_tokens``)
  at no more than that: every step stays within the target, however many tokens wait, so the
  tokens in flight are bounded by how many slowed steps the running streams should sit through:
  ``chunk * max_steps``.
- Otherwise (no chunking, or chunks larger than ``step_tokens``) a step may carry every token in
  flight at once, so they must fit one step: ``step_tokens``.

When ``prefill_chunk_tokens`` is 0 and a target is set, the vLLM decode engine chunks at
``step_tokens`` (``engine_chunk_tokens``; plus one token per running sequence, which vLLM counts in
the same budget), so the first case holds. Tokens counted for a task are the router's estimate of
what is not cached here (``PrefillTask.work_tokens``); they are released when the first token comes
out (the prefill is done) or the request ends. A task that does not fit is refused ("overloaded"):
the router sends it down the prefill path. The worker advertises ``max_tokens`` and the tokens in
flight (``WorkerInfo.local_budget_tokens`` / ``queued_tokens``), so routers rarely offer one in vain.

``itl_target_ms = 0`` (the default) means no budget: slots alone bound local prefills, as before.
The costs are the deployment's to measure (a decode step and a prompt token on its device); for
SmolLM2 on one CPU core (bf16): a step of about 50 ms at 8 streams and 0.7 ms a prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrelay.workers.config import DecodeConfig

UNBOUNDED = 1 << 62


@dataclass(frozen=True)
class ItlBudget:
    itl_target_ms: float = 0.0  # 0: no budget
    step_ms: float = 50.0  # a decode step without prompt tokens
    token_ms: float = 0.7  # what one prompt token adds to a step
    chunk_tokens: int = 0  # prompt tokens the engine computes per step (0: all in one step)
    max_steps: int = 8  # chunked: steps a backlog of local-prefill tokens may stretch

    @classmethod
    def from_config(cls, cfg: DecodeConfig) -> ItlBudget:
        b = cls(cfg.local_itl_target_ms, cfg.local_step_ms, cfg.local_token_ms, cfg.prefill_chunk_tokens,
                cfg.local_budget_steps)
        return b if b.chunk_tokens or not b.enabled else cls(
            b.itl_target_ms, b.step_ms, b.token_ms, b.step_tokens(), b.max_steps)

    @property
    def enabled(self) -> bool:
        return self.itl_target_ms > 0

    def step_tokens(self) -> int:
        """Prompt tokens one step may carry within the target (0: not even one)."""
        if not self.enabled:
            return UNBOUNDED
        if self.token_ms <= 0:
            return UNBOUNDED if self.itl_target_ms >= self.step_ms else 0
        return max(0, int((self.itl_target_ms - self.step_ms) / self.token_ms))

    def max_tokens(self) -> int:
        """Local-prefill tokens in flight at most (``UNBOUNDED`` without a target)."""
        per = self.step_tokens()
        if not self.enabled or per == UNBOUNDED:
            return UNBOUNDED
        if 0 < self.chunk_tokens <= per:
            return self.chunk_tokens * self.max_steps
        return per


def engine_chunk_tokens(cfg: DecodeConfig, max_num_seqs: int) -> int:
    """The decode engine's ``max_num_batched_tokens``: ``decode.prefill_chunk_tokens`` when set; else,
    with an ITL target, the prompt tokens a step may carry plus one per running sequence; else 0."""
    if cfg.prefill_chunk_tokens:
        return cfg.prefill_chunk_tokens
    b = ItlBudget(cfg.local_itl_target_ms, cfg.local_step_ms, cfg.local_token_ms)
    per = b.step_tokens()
    if not b.enabled or per == UNBOUNDED:
        return 0
    return max(1, per) + max_num_seqs


@dataclass
class LocalBudget:
    """Local-prefill tokens admitted and not computed yet, against ``ItlBudget.max_tokens``."""

    budget: ItlBudget = field(default_factory=ItlBudget)
    tokens: int = 0
    _held: dict[str, int] = field(default_factory=dict)

    @property
    def limit(self) -> int:
        """What the worker advertises (0: no budget)."""
        m = self.budget.max_tokens()
        return 0 if m == UNBOUNDED else m

    def admit(self, request_id: str, tokens: int) -> str | None:
        """Count ``tokens`` for ``request_id`` and return None, or why not (nothing counted)."""
        if request_id in self._held:
            return f"request {request_id!r} holds local-prefill budget already"
        limit = self.budget.max_tokens()
        if self.tokens + tokens > limit:
            return (f"local-prefill budget spent: {self.tokens} prompt tokens in flight + {tokens} > {limit} "
                    f"(decode ITL target {self.budget.itl_target_ms:g} ms)")
        self._held[request_id] = tokens
        self.tokens += tokens
        return None

    def done(self, request_id: str) -> None:
        """Its prompt is computed (first token out) or it ended: release its tokens (idempotent)."""
        self.tokens -= self._held.pop(request_id, 0)
