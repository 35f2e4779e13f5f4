"""``kvrelay bench agent``: tool-call checks, the agent loop against a fake
OpenAI-compatible server (canned streamed tool calls), background traffic and the report arithmetic.
``kvrelay up`` itself is stood in for here (its e2e tests run it)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionChunk

from kvrelay.loadtest import agent_report as R
from kvrelay.loadtest import bench_agent as B
from kvrelay.loadtest import tool_server as T
from kvrelay.loadtest.agent_loop import (Agent, AgentConfig, Call, StepRecord, StreamState, check_calls,
                                         filler_words, plan_calls)
from kvrelay.loadtest.cli import BENCHES
from kvrelay.loadtest.metrics import RequestRecord


# --- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture
async def tools() -> AsyncIterator[tuple[T.ToolServer, str]]:
    server = T.ToolServer(latency_ms=0)
    url = await server.start()
    try:
        yield server, url
    finally:
        await server.stop()


# --- tool-call checks, stream assembly, context budget ------------------------------------------------------
def test_plan_calls_are_seeded_and_every_planned_call_is_valid() -> None:
    plan = plan_calls(1, 20, seed=3)
    assert plan == plan_calls(1, 20, seed=3) != plan_calls(2, 20, seed=3)
    assert {c.name for c in plan} == {"calculator", "lookup"}
    assert all(T.validate_arguments(c.name, c.arguments) == [] for c in plan)


def _call(name: str, args: str, cid: str = "c1") -> dict[str, str]:
    return {"id": cid, "name": name, "arguments": args}


def test_check_calls_accepts_parsed_calls_that_meet_their_schemas() -> None:
    calls = [_call("lookup", '{"key": "india"}'), _call("calculator", '{"op":"add","a":1,"b":2}')]
    errors, parsed = check_calls(calls)
    assert errors == []
    assert parsed == [Call("lookup", {"key": "india"}), Call("calculator", {"op": "add", "a": 1, "b": 2})]


@pytest.mark.parametrize(("calls", "why"), [([], "no tool call"), ([_call("lookup", '{"key": ')], "not JSON"),
                                            ([_call("lookup", '{"key": "mars"}')], "mars"),
                                            ([_call("search", "{}")], "unknown tool")])
def test_check_calls_says_why_calls_are_not_valid(calls: list, why: str) -> None:
    errors, _ = check_calls(calls)
    assert errors and why in errors[0]


def _chunk(delta: dict | None = None, reason: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": reason}]
    return {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": choices,
            "usage": usage}


def _tool_delta(index: int, cid: str | None, name: str | None, args: str) -> dict:
    fn = {"arguments": args} | ({"name": name} if name else {})
    call = {"index": index, "type": "function", "function": fn} | ({"id": cid} if cid else {})
    return {"tool_calls": [call]}


def test_stream_state_assembles_tool_call_deltas_by_index_and_times_the_first_output() -> None:
    times = iter(range(1, 100))
    state = StreamState(clock=lambda: float(next(times)))
    for c in [_chunk({"role": "assistant", "content": ""}), _chunk(_tool_delta(0, "a", "lookup", '{"key"')),
              _chunk(_tool_delta(1, "b", "calculator", '{"op": "add",')),
              _chunk(_tool_delta(0, None, None, ': "peru"}')),
              _chunk(_tool_delta(1, None, None, ' "a": 1, "b": 2}'), reason="tool_calls"),
              _chunk(usage={"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59,
                            "prompt_tokens_details": {"cached_tokens": 32}})]:
        state.feed(ChatCompletionChunk.model_validate(c))
    assert state.first_s == 1.0  # the role-only opening chunk is not output
    assert state.tool_calls() == [_call("lookup", '{"key": "peru"}', "a"),
                                  _call("calculator", '{"op": "add", "a": 1, "b": 2}', "b")]
    assert state.finish_reason == "tool_calls" and state.usage.prompt_tokens_details.cached_tokens == 32


def test_filler_words_shrink_as_the_context_nears_its_limit() -> None:
    cfg = AgentConfig(max_context=8192, max_tokens=96, filler_tokens=300)
    assert filler_words(1000, 5, cfg) == 300
    assert 0 < filler_words(6000, 3, cfg) < 300
    assert filler_words(7300, 2, cfg) == 0 and filler_words(100, 0, cfg) == 0
    context, left = 600, 11  # the planned growth never passes the limit
    for _ in range(left):
        context += filler_words(context, left, cfg) + 96 + 96
        left -= 1
    assert context <= 8192


# --- the agent loop against a fake OpenAI-compatible server -------------------------------------------------
def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _planned(messages: list[dict]) -> tuple[str, dict]:
    """The call the last user message asks for (the fake model follows instructions)."""
    text = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    if m := re.search(r"calculator to (add|multiply) (\d+) and (\d+)", text):
        return "calculator", {"op": m[1][:3], "a": int(m[2]), "b": int(m[3])}
    return "lookup", {"key": re.search(r"key '(\w+)'", text)[1]}


class FakeOpenAI:
    """Chat completions answered with the planned tool call (mode ``tools``), as text (``text``: what a
    server without tool calling does), with arguments off the schema (``bad``) or a 500 (``error``)."""

    def __init__(self, mode: str = "tools") -> None:
        self.mode, self.bodies = mode, []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "fake", "object": "model", "max_model_len": 4096}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.mode == "error":
            return web.json_response({"error": {"message": "engine died", "code": "engine"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse(_chunk({"role": "assistant", "content": ""})))
        if body["tool_choice"] == "none" or self.mode == "text":
            await resp.write(_sse(_chunk({"content": "The answer is 5."}, reason="stop")))
        else:
            name, args = _planned(body["messages"])
            if self.mode == "bad":
                args = {**args, "extra": 1}
            text = json.dumps(args)
            await resp.write(_sse(_chunk(_tool_delta(0, f"call{len(self.bodies)}", name, text[:5]))))
            await resp.write(_sse(_chunk(_tool_delta(0, None, None, text[5:]), reason="tool_calls")))
        prompt = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
        usage = {"prompt_tokens": prompt, "completion_tokens": 10, "total_tokens": prompt + 10,
                 "prompt_tokens_details": {"cached_tokens": prompt // 2}}
        await resp.write(_sse(_chunk(usage=usage)))
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    srv = FakeOpenAI()
    runner = web.AppRunner(srv.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield srv, f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def _run_agent(url: str, tools_url: str, cfg: AgentConfig) -> Agent:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    try:
        async with aiohttp.ClientSession() as http:
            agent = Agent(client, "fake", 3, tools_url, http, cfg)
            await agent.run()
    finally:
        await client.close()
    return agent


async def test_agent_runs_its_steps_with_tool_calls_and_grows_the_history(fake, tools) -> None:
    srv, url = fake
    cfg = AgentConfig(steps=3, filler_tokens=20, kv_ttl_s=30.0)
    agent = await _run_agent(url, tools[1], cfg)
    assert [(r.step, r.final, r.valid, r.matched_plan) for r in agent.records] == [
        (1, False, True, True), (2, False, True, True), (3, False, True, True), (4, True, None, False)]
    assert all(r.ttft_ms is not None and r.cached_tokens is not None for r in agent.records)
    assert [b["tool_choice"] for b in srv.bodies] == ["required"] * 3 + ["none"]
    assert all(b["session_id"] == "agent-3" and b["kv_ttl_s"] == 30.0 and b["stream"] for b in srv.bodies)
    assert [t["function"]["name"] for t in srv.bodies[0]["tools"]] == ["calculator", "lookup"]
    history = srv.bodies[-1]["messages"]
    assert [m["role"] for m in history] == ["system", "user"] + ["assistant", "tool", "user"] * 3
    assert history[2]["tool_calls"][0]["id"] == history[3]["tool_call_id"] == "call1"
    assert [len(b["messages"]) for b in srv.bodies] == [2, 5, 8, 11]  # each request extends the last
    result = json.loads(history[3]["content"])
    assert "result" in result and len(result["details"].split()) == agent.records[0].filler_words > 0
    assert agent.records[0].filler_words <= 20


async def test_agent_without_kv_ttl_passes_only_the_session(fake, tools) -> None:
    srv, url = fake
    await _run_agent(url, tools[1], AgentConfig(steps=1, final_answer=False, filler_tokens=0))
    assert len(srv.bodies) == 1 and srv.bodies[0]["session_id"] == "agent-3"
    assert "kv_ttl_s" not in srv.bodies[0]


async def test_agent_answered_as_text_counts_invalid_and_tells_the_planned_result(fake, tools) -> None:
    srv, url = fake
    srv.mode = "text"
    agent = await _run_agent(url, tools[1], AgentConfig(steps=2, final_answer=False, filler_tokens=5))
    assert [(r.valid, r.invalid) for r in agent.records] == [(False, ["no tool call"])] * 2
    history = agent.messages
    assert history[2] == {"role": "assistant", "content": "The answer is 5."}
    assert history[3]["role"] == "user" and history[3]["content"].startswith("Result of ")


async def test_agent_with_calls_off_the_schema_reads_the_tool_servers_error(fake, tools) -> None:
    srv, url = fake
    srv.mode = "bad"
    agent = await _run_agent(url, tools[1], AgentConfig(steps=1, final_answer=False))
    assert agent.records[0].valid is False and "extra" in agent.records[0].invalid[0]
    assert "error" in json.loads(agent.messages[3]["content"])


async def test_agent_stops_at_a_failed_request_with_its_error(fake, tools) -> None:
    srv, url = fake
    srv.mode = "error"
    agent = await _run_agent(url, tools[1], AgentConfig(steps=3))
    assert len(agent.records) == 1 and agent.records[0].error.startswith("http_500")
    assert agent.records[0].valid is False


async def test_run_agents_runs_every_agent_within_the_servers_context(fake, tools) -> None:
    srv, url = fake
    cfg = AgentConfig(steps=2, filler_tokens=10, max_context=8192)
    records = await B.run_agents(url, tools[1], cfg, agents=2)
    steps = sorted((r.agent, r.step) for r in records)
    assert steps == [(f"agent-{i}", k) for i in range(2) for k in (1, 2, 3)]
    assert {b["model"] for b in srv.bodies} == {"fake"}


# --- background traffic -------------------------------------------------------------------------------------
async def test_background_sends_fresh_prompts_until_stopped() -> None:
    enough = asyncio.Event()
    gaps: list[float] = []
    sent: list[Any] = []

    async def send(req, at):
        sent.append(req)
        if len(sent) == 3:
            enough.set()
        return RequestRecord(req.request_id, at, prompt_tokens=len(req.prompt_token_ids))

    async def sleep(s: float) -> None:
        gaps.append(s)
        await asyncio.sleep(0)

    bg = B.Background(send, rps=2.0, seed=1, prompt=(10, 20), output=(4, 4), sleep=sleep)
    bg.start()
    await enough.wait()
    summary = await bg.stop()
    assert summary["sent"] >= 3 and summary["completed"] >= 3 and summary["errors"] == {}
    assert all(10 <= len(r.prompt_token_ids) <= 20 and r.max_tokens == 4 for r in sent)
    assert len({tuple(r.prompt_token_ids) for r in sent}) == len(sent) and all(g > 0 for g in gaps)


async def test_background_at_zero_rps_sends_nothing() -> None:
    bg = B.Background(lambda r, t: None, rps=0.0)
    bg.start()
    assert (await bg.stop())["sent"] == 0


# --- report arithmetic --------------------------------------------------------------------------------------
def _rec(step: int, ttft: float, prompt: int = 100, cached: int = 0, valid: bool = True, final: bool = False,
         error: str | None = None) -> StepRecord:
    calls = [_call("lookup", '{"key": "peru"}')] if valid else []
    return StepRecord("a", step, final=final, ttft_ms=ttft, e2e_ms=ttft * 2, prompt_tokens=prompt,
                      cached_tokens=cached, tool_calls=calls, invalid=[] if valid else ["no tool call"],
                      error=error)


def test_per_step_gives_percentiles_and_the_ratio_to_step_one() -> None:
    recs = [_rec(1, 100), _rec(1, 300), _rec(2, 150), _rec(2, 150), _rec(2, 9000, error="timeout"),
            _rec(3, 50, final=True)]
    block = R.per_step(recs, steps=2)
    assert block["1"]["n"] == 2 and block["1"]["ttft_ms_p50"] == pytest.approx(100, rel=1e-3)
    assert block["1"]["ttft_ms_p90"] == pytest.approx(300, rel=1e-3)
    assert block["2"]["n"] == 2 and block["2"]["ttft_p50_vs_step1"] == pytest.approx(1.5, rel=1e-3)
    assert block["1"]["ttft_p50_vs_step1"] == 1.0


def test_tokens_count_prompt_cached_and_computed_of_successful_requests() -> None:
    recs = [_rec(2, 1, prompt=1000, cached=960), _rec(3, 1, prompt=1200, cached=1184),
            _rec(3, 1, error="timeout")]
    assert R.tokens(recs) == {"requests": 2, "without_usage": 0, "prompt_tokens": 2200, "cached_tokens": 2144,
                              "computed_tokens": 56, "cached_share": round(2144 / 2200, 4)}


def test_reusable_is_what_the_previous_request_of_the_same_agent_held() -> None:
    a = [StepRecord("a", 1, prompt_tokens=1000, completion_tokens=40, cached_tokens=0),
         StepRecord("a", 2, prompt_tokens=1300, completion_tokens=40, cached_tokens=1000),
         StepRecord("a", 3, prompt_tokens=1020, completion_tokens=40, cached_tokens=1000)]  # a shorter prompt
    b = [StepRecord("b", 1, prompt_tokens=500), StepRecord("b", 3, prompt_tokens=900)]  # step 2 missing
    held = R.reusable(a[::-1] + b)
    assert held == {("a", 2): 1040, ("a", 3): 1020}
    later = R.tokens(a[1:] + b[1:], held)
    assert (later["prompt_tokens"], later["cached_tokens"], later["reusable_tokens"]) == (3220, 2000, 2060)
    assert later["cached_of_reusable"] == round(2000 / 2060, 4)
    assert later["reusable_share"] == round(2060 / 3220, 4)


def test_tool_calls_share_counts_answered_tool_steps_only() -> None:
    recs = [_rec(1, 1), _rec(2, 1, valid=False), _rec(3, 1, error="timeout"),
            _rec(4, 1, final=True, valid=False)]
    calls = R.tool_calls(recs)
    assert (calls["steps"], calls["valid"], calls["valid_share"], calls["no_call"]) == (2, 1, 0.5, 1)
    assert calls["invalid_examples"] == ["1x no tool call"]


def test_targets_say_met_unmet_or_unknown() -> None:
    block = {"1": {"ttft_p50_vs_step1": 1.0}, "10": {"ttft_p50_vs_step1": 1.4}}
    t = R.targets(block, {"cached_share": 0.85}, {"valid_share": 1.0})
    assert [t[k]["met"] for k in t] == [True, False, True]
    unknown = R.targets({}, {"cached_share": None}, {"valid_share": None})
    assert [v["met"] for v in unknown.values()] == [None] * 3


def test_metric_delta_subtracts_before_from_after_and_kv_bytes_sums_the_workers() -> None:
    before = {"decode": {R.KV_BYTES: {"": 100.0}}, "prefill": {"x": {"": 1.0}}, "router": {"error": "down"}}
    after = {"decode": {R.KV_BYTES: {"": 4196.0}}, "prefill": {"x": {"": 3.0}}, "router": {"y": {}}}
    delta = R.metric_delta(before, after)
    assert delta == {"decode": {R.KV_BYTES: {"": 4096.0}}, "prefill": {"x": {"": 2.0}},
                     "router": {"error": "down"}}
    assert R.kv_bytes(delta) == 4096.0


def test_report_block_holds_every_figure_and_counts_errors() -> None:
    recs = [_rec(1, 100), _rec(2, 120, prompt=500, cached=480), _rec(2, 1, error="timeout"),
            _rec(3, 90, final=True)]
    block = R.report_block(recs, steps=2)
    assert block["errors"] == {"timeout": 1} and block["final_answer"]["n"] == 1
    assert block["tokens_after_step1"]["cached_share"] == pytest.approx(480 / 600, abs=1e-4)
    assert set(block) == {"per_step", "final_answer", "tokens_step1", "tokens_after_step1", "tool_calls",
                          "targets", "errors"}


# --- command line -------------------------------------------------------------------------------------------
def test_bench_agent_is_a_registered_bench_with_the_briefs_defaults() -> None:
    assert BENCHES["agent"][0] == "kvrelay.loadtest.bench_agent"
    args = B.parse_args([])
    assert (args.agents, args.steps, args.tool_latency_ms, args.model) == (4, 10, 200.0, "smollm2")
    assert args.kv_ttl_s == 0.0 and args.variants == ["transfer", "local"]
    assert B.VARIANTS["transfer"] == ("router.kv_local_prefill=false",)


@pytest.mark.parametrize("argv", [["--agents", "0"], ["--steps", "0"], ["--background-rps", "-1"]])
def test_bench_agent_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        B.parse_args(argv)


class FakeDeployment:
    """Stands in for ``Disaggregated``: fails to start with each of ``failures`` in turn, then starts."""

    failures: list[str] = []
    made: list[FakeDeployment] = []

    def __init__(self, engine: Any, log_dir: Any, prefill: int, decode: int, sets: tuple) -> None:
        self.log_dir, self.sets, self.started_s = log_dir, sets, 0.0
        FakeDeployment.made.append(self)

    async def start(self) -> str:
        from kvrelay.loadtest.deployments import DeploymentError

        if FakeDeployment.failures:
            raise DeploymentError(FakeDeployment.failures.pop(0))
        return "http://fake"


@pytest.fixture
def fake_deployment(monkeypatch) -> type[FakeDeployment]:
    from kvrelay.loadtest import deployments

    monkeypatch.setattr(deployments, "Disaggregated", FakeDeployment)
    FakeDeployment.made = []
    return FakeDeployment


async def test_start_deployment_starts_again_when_a_port_was_taken(fake_deployment, tmp_path) -> None:
    fake_deployment.failures = ["OSError: [Errno 98] address already in use"]
    dep, url, ports = await B.start_deployment("local+ttl", B.parse_args(["--model", "tiny"]), tmp_path)
    assert url == "http://fake" and dep is fake_deployment.made[-1] and len(fake_deployment.made) == 2
    assert [d.log_dir.name for d in fake_deployment.made] == ["local-ttl", "local-ttl-retry"]
    assert ports["prefill"] != ports["decode"]
    metrics = (f"prefill.metrics_port={ports['prefill']}", f"decode.metrics_port={ports['decode']}")
    assert dep.sets == (*B.variant_sets("local", B.parse_args([])), *metrics)


async def test_start_deployment_gives_up_on_other_failures(fake_deployment, tmp_path) -> None:
    from kvrelay.loadtest.deployments import DeploymentError

    fake_deployment.failures = ["model not found"]
    with pytest.raises(DeploymentError, match="model not found"):
        await B.start_deployment("transfer", B.parse_args([]), tmp_path)
    assert len(fake_deployment.made) == 1


def test_variant_sets_switch_local_prefill_and_share_the_threshold() -> None:
    args = B.parse_args(["--local-threshold-tokens", "700"])
    threshold = "router.kv_local_threshold_tokens=700"
    assert B.variant_sets("transfer", args) == ("router.kv_local_prefill=false", threshold)
    assert B.variant_sets("local+ttl", args) == ("router.kv_local_prefill=true", threshold)
