"""One tool-calling agent of ``kvrelay bench agent``, through the official ``openai`` client.

An agent has a seeded plan of tool calls (``plan_calls``), one per step. Its history starts with
a system prompt, then a task (``brief_tokens`` words of background notes, the long shared-by-no-one
context real agents start with) and the first instruction. Each
step is a streamed chat completion with ``tools=[calculator, lookup]`` and
``tool_choice="required"``; then the agent runs the returned ``tool_calls`` against the tool
server (``tool_server.py``) and appends the assistant message (with its ``tool_calls``), one
``{"role": "tool", "tool_call_id", "content"}`` message per call (the server's JSON answer, an
error included, carrying ``filler_words`` words of detail) and the next instruction. A step that
returned no tool call at all (a server that answers tools as plain text) appends its text and
the planned call's result as a user message, so every variant's history grows alike. With
``final_answer`` one more step asks for an answer with ``tool_choice="none"``. The context is
kept under the model's limit: the filler shrinks (``filler_words``) as the history nears it.

Every request passes ``extra_body={"session_id": <agent id>}`` (kvrelay's decode affinity) and,
when ``kv_ttl_s`` > 0, ``extra_body["kv_ttl_s"]``. A failed request ends its agent.

TTFT is measured on the stream: from just before the request is sent to the first chunk that
carries content text or a tool-call delta (a role-only opening chunk does not count). E2E is to
the stream's end. Tool-call deltas are assembled here (``StreamState``) by their ``index``;
token counts come from the final usage chunk (``stream_options.include_usage``), cached tokens
from ``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvrelay.loadtest.tool_server import BOUND, LOOKUP, filler, openai_tools, validate_arguments

SYSTEM = ("You are a careful assistant that works step by step. For every step call exactly one of the "
          "tools (calculator, lookup) with arguments that follow its schema, then read its result.")
FINAL = "All steps are done. Answer in one short sentence: what did the tools return?"
MARGIN = 0.1  # the share of the context kept free (token estimates are approximate)
# tokens a step adds beside the filler: the call, the template, the result's JSON, the next instruction
STEP_OVERHEAD = 96
DETAIL_CHARS = 200


@dataclass(frozen=True)
class Call:
    """A tool call: the one an agent's plan asks for, or one a response made (arguments parsed)."""

    name: str
    arguments: dict[str, Any]

    def instruction(self) -> str:
        if self.name == "calculator":
            verb = "add" if self.arguments["op"] == "add" else "multiply"
            return f"Use the calculator to {verb} {self.arguments['a']} and {self.arguments['b']}."
        return f"Use lookup to find the capital of {self.arguments['key']} (key '{self.arguments['key']}')."


def plan_calls(agent: int, steps: int, seed: int) -> list[Call]:
    """The calls agent ``agent`` is asked to make, one per step (seeded: every variant gets the same)."""
    rng = np.random.default_rng([seed, agent, 0xA6E])
    keys = sorted(LOOKUP)
    out = []
    for _ in range(steps):
        if rng.random() < 0.5:
            a, b = (int(x) for x in rng.integers(0, min(BOUND, 100), 2))
            out.append(Call("calculator", {"op": str(rng.choice(["add", "mul"])), "a": a, "b": b}))
        else:
            out.append(Call("lookup", {"key": keys[int(rng.integers(len(keys)))]}))
    return out


@dataclass(frozen=True)
class AgentConfig:
    steps: int = 10
    max_tokens: int = 96  # per step
    brief_tokens: int = 1500  # words of the first message's background notes (about 1 token each)
    filler_tokens: int = 200  # words of each tool result's details (about 1 token each)
    max_context: int = 8192  # the model's limit (the server's max_model_len when it says)
    kv_ttl_s: float = 0.0  # > 0: passed as extra_body["kv_ttl_s"]
    final_answer: bool = True
    timeout_s: float = 300.0  # per request
    seed: int = 0


@dataclass
class StepRecord:
    agent: str
    step: int  # 1..steps; steps + 1 is the final answer
    final: bool = False
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    content: str = ""
    tool_calls: list[dict[str, str]] = field(default_factory=list)  # {"id", "name", "arguments"} as sent
    invalid: list[str] = field(default_factory=list)  # why the calls are not valid ([] = valid)
    matched_plan: bool = False  # the first call is the planned one
    filler_words: int = 0  # words of detail asked for the results this step got
    error: str | None = None

    @property
    def valid(self) -> bool | None:
        """Whether the step's tool calls parsed and met their schemas (None for a final answer)."""
        return None if self.final else self.error is None and not self.invalid

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self) | {"valid": self.valid}


class StreamState:
    """What a streamed chat completion said: first-output time, text, tool calls, usage."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.first_s: float | None = None
        self.text: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.usage: Any = None
        self.finish_reason: str | None = None

    def feed(self, chunk: Any) -> None:
        if getattr(chunk, "usage", None) is not None:
            self.usage = chunk.usage
        for choice in chunk.choices or []:
            delta = choice.delta
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
            if delta is None:
                continue
            if delta.content or delta.tool_calls:
                self.first_s = self.first_s if self.first_s is not None else self.clock()
            if delta.content:
                self.text.append(delta.content)
            for tc in delta.tool_calls or []:
                call = self.calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                if tc.function is not None:
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""

    def tool_calls(self) -> list[dict[str, str]]:
        return [self.calls[i] for i in sorted(self.calls)]


def check_calls(calls: list[dict[str, str]]) -> tuple[list[str], list[Call | None]]:
    """Why ``calls`` are not valid ([] when all parse and meet their schemas), and each call parsed."""
    if not calls:
        return ["no tool call"], []
    errors: list[str] = []
    parsed: list[Call | None] = []
    for i, c in enumerate(calls):
        try:
            args = json.loads(c["arguments"] or "null")
        except ValueError:
            errors.append(f"call {i}: arguments are not JSON: {c['arguments'][:DETAIL_CHARS]!r}")
            parsed.append(None)
            continue
        found = validate_arguments(c["name"], args)
        errors += [f"call {i} ({c['name']}): {e}" for e in found]
        parsed.append(None if found else Call(c["name"], args))
    return errors, parsed


def filler_words(context_tokens: int, requests_left: int, cfg: AgentConfig) -> int:
    """Words of detail for the next tool results: ``cfg.filler_tokens``, less as the context nears its limit
    (room for every request left, each with its overhead and output, within ``1 - MARGIN`` of it)."""
    if requests_left <= 0:
        return 0
    room = int(cfg.max_context * (1 - MARGIN)) - context_tokens
    share = room // requests_left - STEP_OVERHEAD - cfg.max_tokens
    return max(0, min(cfg.filler_tokens, share))


def _error(exc: BaseException) -> str:
    import openai

    if isinstance(exc, asyncio.TimeoutError | openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}: {str(exc.message)[:DETAIL_CHARS]}"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection: {exc!r}"[:DETAIL_CHARS]
    return f"{type(exc).__name__}: {str(exc)[:DETAIL_CHARS]}"


class Agent:
    """One agent's loop: ``await Agent(...).run()`` -> its step records."""

    def __init__(self, client: Any, model: str, index: int, tools_url: str, http: Any, cfg: AgentConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.model, self.tools_url, self.http, self.cfg = client, model, tools_url, http, cfg
        self.id, self.clock = f"agent-{index}", clock
        self.plan = plan_calls(index, cfg.steps, cfg.seed)
        brief = filler(cfg.brief_tokens, f"{self.id}-brief-{cfg.seed}")
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"You are {self.id}. Background notes: {brief}\n\n"
                                        f"Step 1: {self.plan[0].instruction()}"}]
        self.records: list[StepRecord] = []

    async def run(self) -> list[StepRecord]:
        requests = self.cfg.steps + int(self.cfg.final_answer)
        for k in range(1, self.cfg.steps + 1):
            rec = await self.step(k, "required")
            if rec.error is not None:
                return self.records
            context = (rec.prompt_tokens or 0) + (rec.completion_tokens or 0)
            rec.filler_words = filler_words(context, requests - k, self.cfg)
            await self.use_tools(rec, self.plan[k - 1])
            if k < self.cfg.steps:
                nxt = f"Step {k + 1}: {self.plan[k].instruction()}"
                self.messages.append({"role": "user", "content": nxt})
        if self.cfg.final_answer:
            self.messages.append({"role": "user", "content": FINAL})
            await self.step(self.cfg.steps + 1, "none")
        return self.records

    def extra_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"session_id": self.id}
        if self.cfg.kv_ttl_s > 0:
            body["kv_ttl_s"] = self.cfg.kv_ttl_s
        return body

    async def step(self, k: int, tool_choice: str) -> StepRecord:
        rec = StepRecord(self.id, k, final=tool_choice == "none")
        self.records.append(rec)
        state = StreamState(self.clock)
        t0 = self.clock()
        try:
            await asyncio.wait_for(self._stream(state, tool_choice), self.cfg.timeout_s)
        except Exception as exc:  # any failure of the request is the step's error, never the bench's
            rec.error = _error(exc)
        end = self.clock()
        rec.e2e_ms = (end - t0) * 1e3
        rec.ttft_ms = None if state.first_s is None else (state.first_s - t0) * 1e3
        rec.content, rec.tool_calls = "".join(state.text), state.tool_calls()
        rec.finish_reason = state.finish_reason
        if state.usage is not None:
            rec.prompt_tokens = state.usage.prompt_tokens
            rec.completion_tokens = state.usage.completion_tokens
            details = getattr(state.usage, "prompt_tokens_details", None)
            rec.cached_tokens = getattr(details, "cached_tokens", None) if details is not None else None
        if not rec.final:
            rec.invalid, parsed = check_calls(rec.tool_calls)
            rec.matched_plan = bool(parsed) and parsed[0] == self.plan[k - 1]
        return rec

    async def _stream(self, state: StreamState, tool_choice: str) -> None:
        stream = await self.client.chat.completions.create(
            model=self.model, messages=self.messages, tools=openai_tools(), tool_choice=tool_choice,
            stream=True, stream_options={"include_usage": True}, max_tokens=self.cfg.max_tokens,
            temperature=0.0, extra_body=self.extra_body())
        async for chunk in stream:
            state.feed(chunk)

    async def call_tool(self, name: str, arguments: Any, pad: int, salt: str) -> str:
        """The tool server's answer (its JSON text, an error included)."""
        body = {"name": name, "arguments": arguments, "pad_words": pad, "salt": salt}
        try:
            async with self.http.post(self.tools_url + "/call", json=body) as r:
                return await r.text()
        except Exception as exc:  # a tool that fails is a result the agent reads, as in a real loop
            return json.dumps({"error": f"tool server: {exc!r}"[:DETAIL_CHARS]})

    async def use_tools(self, rec: StepRecord, planned: Call) -> None:
        salt = f"{self.id}-{rec.step}"
        if not rec.tool_calls:  # answered as text: run the planned call, tell the result as the user
            self.messages.append({"role": "assistant", "content": rec.content})
            result = await self.call_tool(planned.name, planned.arguments, rec.filler_words, salt)
            self.messages.append({"role": "user", "content": f"Result of {planned.name}: {result}"})
            return
        calls = [{"id": c["id"] or f"call-{self.id}-{rec.step}-{i}", "type": "function",
                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for i, c in enumerate(rec.tool_calls)]
        self.messages.append({"role": "assistant", "content": rec.content or None, "tool_calls": calls})
        for c in calls:
            try:
                args = json.loads(c["function"]["arguments"] or "null")
            except ValueError:
                args = c["function"]["arguments"]  # the server says why it is not valid
            result = await self.call_tool(c["function"]["name"], args, rec.filler_words // len(calls), salt)
            self.messages.append({"role": "tool", "tool_call_id": c["id"], "content": result})
