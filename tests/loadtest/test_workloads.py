"""Workloads: seeded and reproducible; steps extend their context exactly; prefixes shared."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from kvrelay.loadtest.workloads import (
    KINDS,
    AgenticConfig,
    LongdocConfig,
    MixConfig,
    MultiturnConfig,
    WorkloadError,
    generate,
)

SMALL = {"multiturn": MultiturnConfig(sessions=12), "agentic": AgenticConfig(sessions=8),
         "longdoc": LongdocConfig(sessions=10, doc_tokens=(500, 800)), "mix": MixConfig(sessions=10)}


def _gen(kind: str, seed: int = 1, **kw):
    return generate(kind, seed, SMALL.get(kind), **({"max_requests": 60} | kw))


@pytest.mark.parametrize("kind", [*KINDS, "mix"])
def test_workload_same_seed_same_requests(kind: str) -> None:
    a, b = list(_gen(kind).requests()), list(_gen(kind).requests())
    assert len(a) == len(b) > 0
    assert [(r.request_id, r.tenant, list(r.prompt), r.output_len, r.start_s, r.delay_s) for r in a] == \
           [(r.request_id, r.tenant, list(r.prompt), r.output_len, r.start_s, r.delay_s) for r in b]
    other = list(_gen(kind, seed=2).requests())
    assert [list(r.prompt) for r in other] != [list(r.prompt) for r in a]


@pytest.mark.parametrize("kind", KINDS)
def test_workload_steps_extend_their_previous_context_exactly(kind: str) -> None:
    for s in _gen(kind).sessions:
        for i in range(1, len(s.steps)):
            prev, cur = s.prompt(i - 1), s.prompt(i)
            context = prev + s.output(i - 1)
            assert cur[: len(context)] == context and len(cur) > len(context)
            assert s.steps[i].delay_kind in ("think", "tool") and s.steps[i].delay_s > 0
        assert s.steps[0].delay_kind == "start" and s.steps[0].delay_s == 0


def test_workload_agentic_appends_a_tool_result_of_a_few_hundred_tokens() -> None:
    cfg = SMALL["agentic"]
    for s in _gen("agentic").sessions:
        assert cfg.steps[0] <= len(s.steps) <= cfg.steps[1]
        for i in range(1, len(s.steps)):
            added = s.steps[i].prompt_len - s.steps[i - 1].prompt_len - s.steps[i - 1].output_len
            assert cfg.tool_result_tokens[0] <= added <= cfg.tool_result_tokens[1]
            assert cfg.tool_pause_s[0] <= s.steps[i].delay_s <= cfg.tool_pause_s[1]


def test_workload_system_prompts_are_shared_across_conversations() -> None:
    cfg = MultiturnConfig(sessions=40, tenants=2, pool=2, system_tokens=(64, 64))
    heads = Counter((s.tenant, tuple(s.tokens[:64])) for s in generate("multiturn", 3, cfg).sessions)
    assert len(heads) <= 4  # at most pool prompts per tenant
    assert max(heads.values()) > 1  # several conversations start with the same system prompt
    by_prompt = {}
    for (tenant, head), _ in heads.items():
        by_prompt.setdefault(head, set()).add(tenant)
    assert all(len(t) == 1 for t in by_prompt.values())  # pools are per tenant


def _common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_workload_longdoc_questions_share_popular_documents() -> None:
    ws = _gen("longdoc").sessions
    longest_system = SMALL["longdoc"].system_tokens[1]
    shared = [(a.session_id, b.session_id) for i, a in enumerate(ws) for b in ws[i + 1:]
              if _common(a.prompt(0), b.prompt(0)) > longest_system + 100]  # system prompt + a document
    assert shared


def test_workload_cot_has_short_prompts_and_long_outputs() -> None:
    for s in generate("cot", 0, max_requests=50).sessions:
        (step,) = s.steps
        assert step.output_len >= 1000 and step.prompt_len <= 600


def test_workload_first_sessions_do_not_depend_on_the_count() -> None:
    few = generate("multiturn", 5, MultiturnConfig(sessions=3)).sessions
    many = generate("multiturn", 5, MultiturnConfig(sessions=30)).sessions
    assert [list(s.tokens) for s in few] == [list(s.tokens) for s in many[:3]]


def test_workload_max_requests_and_rate() -> None:
    w = generate("agentic", 0, AgenticConfig(sessions=1), max_requests=37)
    assert w.num_requests == 37 and len(w.sessions) > 1  # sessions until 37 requests
    assert len(generate("agentic", 0, AgenticConfig(sessions=3)).sessions) == 3
    fast = w.with_rate(10.0)
    starts = [fast.start_s(s) for s in fast.sessions]
    assert starts == sorted(starts) and starts[0] == 0.0
    assert [fast.start_s(s) * 10 for s in fast.sessions] == pytest.approx([w.start_s(s) for s in w.sessions])


@pytest.mark.parametrize("bad", [
    lambda: generate("nope"),
    lambda: generate("multiturn", 0, AgenticConfig()),
    lambda: generate("multiturn", 0, max_requests=0),
    lambda: MultiturnConfig(turns=(5, 2)),
    lambda: replace(MultiturnConfig(), sessions=0),
    lambda: generate("multiturn", max_requests=2).with_rate(0),
])
def test_workload_bad_input_is_a_clear_error(bad) -> None:
    with pytest.raises(WorkloadError):
        bad()
