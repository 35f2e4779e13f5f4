"""The decode worker's local-prefill ITL budget (workers/local_budget.py): pure arithmetic and counting."""

from __future__ import annotations

import random

from kvrelay.workers.config import DecodeConfig
from kvrelay.workers.local_budget import UNBOUNDED, ItlBudget, LocalBudget, engine_chunk_tokens


def test_local_budget_step_tokens_keep_a_step_within_the_target() -> None:
    b = ItlBudget(itl_target_ms=120.0, step_ms=50.0, token_ms=0.7)
    assert b.step_tokens() == 100  # 50 ms + 100 * 0.7 ms = 120 ms
    assert b.step_ms + b.step_tokens() * b.token_ms <= b.itl_target_ms
    assert b.step_ms + (b.step_tokens() + 1) * b.token_ms > b.itl_target_ms
    assert ItlBudget(itl_target_ms=40.0, step_ms=50.0).step_tokens() == 0  # not even one token fits
    assert ItlBudget(itl_target_ms=60.0, step_ms=50.0, token_ms=0.0).step_tokens() == UNBOUNDED


def test_local_budget_unchunked_backlog_must_fit_one_step_chunked_spreads_over_steps() -> None:
    base = dict(itl_target_ms=120.0, step_ms=50.0, token_ms=0.7, max_steps=8)
    assert ItlBudget(**base).max_tokens() == 100  # one step may take in every token in flight
    assert ItlBudget(**base, chunk_tokens=64).max_tokens() == 64 * 8  # every step within the target
    assert ItlBudget(**base, chunk_tokens=512).max_tokens() == 100  # chunks above the step budget: no help
    assert ItlBudget().max_tokens() == UNBOUNDED and not ItlBudget().enabled


def test_local_budget_from_config_chunks_at_the_step_budget_when_the_engine_is_not_chunked() -> None:
    cfg = DecodeConfig(local_itl_target_ms=120.0, local_step_ms=50.0, local_token_ms=0.7, local_budget_steps=4)
    b = ItlBudget.from_config(cfg)
    assert (b.chunk_tokens, b.max_tokens()) == (100, 400)
    assert engine_chunk_tokens(cfg, 16) == 100 + 16  # vLLM counts one token per running sequence
    chunked = cfg.replace(prefill_chunk_tokens=64)
    assert (ItlBudget.from_config(chunked).max_tokens(), engine_chunk_tokens(chunked, 16)) == (256, 64)
    off = DecodeConfig()
    assert (LocalBudget(ItlBudget.from_config(off)).limit, engine_chunk_tokens(off, 16)) == (0, 0)
    assert engine_chunk_tokens(DecodeConfig(local_itl_target_ms=10.0), 8) == 1 + 8  # at least vLLM's minimum


def test_local_budget_admits_until_spent_and_releases_once() -> None:
    lb = LocalBudget(ItlBudget(itl_target_ms=120.0, step_ms=50.0, token_ms=0.7))  # 100 tokens
    assert lb.limit == 100
    assert lb.admit("a", 60) is None and lb.admit("b", 40) is None
    why = lb.admit("c", 1)
    assert why is not None and "100 prompt tokens in flight" in why and "120 ms" in why
    assert lb.admit("a", 1) is not None  # one count per request
    lb.done("a")
    lb.done("a")  # idempotent
    assert lb.tokens == 40 and lb.admit("c", 60) is None
    assert lb.admit("d", 101) is not None  # over the whole budget: never
    unbounded = LocalBudget()
    assert unbounded.admit("x", 10**9) is None and unbounded.limit == 0 and unbounded.tokens == 10**9


def test_local_budget_never_exceeds_its_limit_under_random_admits_and_releases() -> None:
    rng = random.Random(3)
    lb = LocalBudget(ItlBudget(itl_target_ms=200.0, step_ms=40.0, token_ms=0.5, chunk_tokens=64, max_steps=4))
    held: dict[str, int] = {}
    for i in range(5000):
        if held and rng.random() < 0.45:
            rid = rng.choice(sorted(held))
            lb.done(rid)
            held.pop(rid)
        else:
            n = rng.randint(1, 200)
            if lb.admit(f"r{i}", n) is None:
                held[f"r{i}"] = n
        assert lb.tokens == sum(held.values()) <= lb.limit == 256
