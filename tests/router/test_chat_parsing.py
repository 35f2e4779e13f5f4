"""Tools and reasoning through our ChatPlan over vLLM's own parsers, on canned model output (no model runs).

Each format is driven as the router drives it: a plan per request (``ChatFeatures.plan``), the output's
token ids with the text a worker would send (decoded with the plan's ``skip_special_tokens``), whole
(``plan.full``) or in chunks (``plan.delta``). Streamed deltas are assembled as the openai client does
(per tool-call index, every string field concatenated) and must equal the whole parse.

The formats: Hermes (SmolLM2's tokenizer as is), Llama-3 JSON (a tokenizer copy with ``<|python_tag|>``),
Qwen3 reasoning + Hermes tools and DeepSeek-R1 reasoning (a copy with ``<think>``/``</think>`` as added,
non-special tokens, as those models have them), gpt-oss harmony (token ids from the harmony encoding;
vLLM's HarmonyParser parses ids only). vLLM is imported once per module (~12 s).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvrelay import models
from kvrelay.router.chat_parsing import ChatFeatures, ChatPlan
from kvrelay.router.config import ChatConfig
from kvrelay.router.openai_api import parse
from kvrelay.router.tokenizer import RouterTokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
TOOLS = [WEATHER, ADD]
USER = [{"role": "user", "content": "Weather in Paris, and 1 + 2?"}]
CHAT = {"model": "m", "messages": USER}
TOOL_CHAT = CHAT | {"tools": TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
PROMPT_IDS = [1, 2, 3]  # the router sets the prompt's ids on every plan before parsing (http.py, intake.py)

CALL_W = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_A = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
W_ARGS, A_ARGS = '{"city": "Paris"}', '{"a": 1, "b": 2}'
HARMONY_CALL = ("<|channel|>analysis<|message|>The user wants the weather.<|end|><|start|>assistant"
                "<|channel|>commentary to=functions.get_weather <|constrain|>json"
                '<|message|>{"city": "Paris"}<|call|>')
HARMONY_FINAL = ("<|channel|>analysis<|message|>Just greet.<|end|><|start|>assistant"
                 "<|channel|>final<|message|>Hello there!<|return|>")

# chunk sizes in tokens, cycled over the output; 0 = a chunk without tokens (ending with 0: the last
# chunk has none, a finish the worker reports after its last token)
CHUNKINGS = [(1,), (2,), (3,), (7,), (1, 3, 2, 7, 5), (4, 1, 1, 6, 0)]


@dataclass
class Output:
    """What one format's model wrote, and how its parse must come out."""

    features: ChatFeatures
    body: dict[str, Any]
    ids: list[int]
    decode: Callable[[list[int], bool], str]  # (ids, skip_special_tokens) -> text
    content: str | None
    reasoning: str | None
    calls: list[tuple[str, str]]
    reason: str


# --- fixtures -----------------------------------------------------------------------------------------
def tokenizer_copy(folder: Path, special: tuple[str, ...] = (), plain: tuple[str, ...] = ()) -> Any:
    """SmolLM2's tokenizer, loaded afresh (the files stay as they are), with tokens added in memory."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return tok


def loaded(tokenizer: Any, tool: str = "", reasoning: str = "", **cfg: Any) -> ChatFeatures:
    features = ChatFeatures(ChatConfig(tool_call_parser=tool, reasoning_parser=reasoning, **cfg), tokenizer)
    features._load_sync()
    return features


@pytest.fixture(scope="module")
def folder() -> Path:
    return models.resolve("smollm2")


@pytest.fixture(scope="module")
def smol(folder: Path) -> Iterator[RouterTokenizer]:
    tok = RouterTokenizer.load_sync(folder)
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def hermes(smol: RouterTokenizer) -> ChatFeatures:
    return loaded(smol.hf, "hermes", chat_template="chatml-tools")


@pytest.fixture(scope="module")
def outputs(smol: RouterTokenizer, hermes: ChatFeatures, folder: Path) -> dict[str, Output]:
    from vllm.entrypoints.openai.parser.harmony_utils import get_encoding

    def text_of(tok: Any) -> Callable[[list[int], bool], str]:
        return lambda ids, skip: tok.decode(ids, skip_special_tokens=skip)

    def ids_of(tok: Any, text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    llama = tokenizer_copy(folder, special=("<|python_tag|>",))
    think = tokenizer_copy(folder, plain=("<think>", "</think>"))
    harmony = get_encoding()
    harmony_text = lambda ids, skip: harmony.decode(ids)  # noqa: E731 (HarmonyParser reads the ids)
    harmony_ids = lambda text: harmony.encode(text, allowed_special="all")  # noqa: E731
    harmony_features = loaded(smol.hf, "openai", "openai_gptoss")
    hermes_text = "Let me check." + CALL_W + CALL_A
    return {
        "hermes": Output(hermes, TOOL_CHAT, ids_of(smol.hf, hermes_text), text_of(smol.hf), "Let me check.",
                         None, [("get_weather", W_ARGS), ("add", A_ARGS)], "tool_calls"),
        "llama3_json": Output(
            loaded(llama, "llama3_json"), TOOL_CHAT,
            ids_of(llama, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                          '{"name": "add", "parameters": {"a": 1, "b": 2}}'),
            text_of(llama), None, None, [("get_weather", W_ARGS), ("add", A_ARGS)], "tool_calls"),
        "qwen3+hermes": Output(
            loaded(think, "hermes", "qwen3"), TOOL_CHAT,
            ids_of(think, "<think>I need the weather first.</think>Checking." + CALL_W), text_of(think),
            "Checking.", "I need the weather first.", [("get_weather", W_ARGS)], "tool_calls"),
        "deepseek_r1": Output(  # R1's template opens <think> in the prompt: the output starts inside it
            loaded(think, "", "deepseek_r1"), CHAT,
            ids_of(think, "The user greets me. Greet back.</think>Hello! How can I help?"), text_of(think),
            "Hello! How can I help?", "The user greets me. Greet back.", [], "stop"),
        "harmony_call": Output(harmony_features, TOOL_CHAT, harmony_ids(HARMONY_CALL), harmony_text, None,
                               "The user wants the weather.", [("get_weather", W_ARGS)], "tool_calls"),
        "harmony_final": Output(harmony_features, TOOL_CHAT, harmony_ids(HARMONY_FINAL), harmony_text,
                                "Hello there!", "Just greet.", [], "stop"),
    }


# --- helpers ------------------------------------------------------------------------------------------
def plan_of(features: ChatFeatures, body: dict[str, Any]) -> ChatPlan:
    """``features.plan(body)`` without an event loop (the module's features outlive each test's loop),
    with the prompt's ids set as the router sets them."""
    from kvrelay.router.chat_vllm import make_plan

    plan = make_plan(body, features._parser_cls, features.tokenizer, bool(features.tool_parser))
    plan.prompt_token_ids = PROMPT_IDS
    return plan


def hermes_output(hermes: ChatFeatures, smol: RouterTokenizer, text: str, body: dict[str, Any]) -> Output:
    """``text`` as SmolLM2 wrote it, for a hermes request (no expectations: the test states them)."""
    return Output(hermes, body, smol.hf.encode(text, add_special_tokens=False),
                  lambda ids, skip: smol.hf.decode(ids, skip_special_tokens=skip), None, None, [], "")


def full(out: Output, body: dict[str, Any] | None = None, worker_reason: str = "stop") -> tuple[dict, str]:
    plan = plan_of(out.features, body or out.body)
    return plan.full(out.decode(out.ids, plan.skip_special_tokens), out.ids, worker_reason)


def stream(out: Output, sizes: tuple[int, ...], body: dict[str, Any] | None = None,
           worker_reason: str = "stop") -> tuple[list[dict], str]:
    """The deltas of the output sent in chunks of ``sizes`` tokens (cycled), and the finish reason."""
    plan = plan_of(out.features, body or out.body)
    bounds, start = [], 0
    for size in itertools.cycle(sizes):
        if start >= len(out.ids):
            break
        bounds.append((start, min(start + size, len(out.ids))))
        start += size
    if sizes[-1] == 0:
        bounds.append((len(out.ids), len(out.ids)))
    deltas = []
    for i, (a, b) in enumerate(bounds):
        before, now = (out.decode(out.ids[:n], plan.skip_special_tokens) for n in (a, b))
        assert now.startswith(before)  # a worker sends the new text of its detokenizer
        delta = plan.delta(now[len(before):], out.ids[a:b], i == len(bounds) - 1)
        if delta:
            deltas.append(delta)
    return deltas, plan.finish_reason(worker_reason, plan.tools_streamed)


def assemble(deltas: list[dict]) -> dict[str, Any]:
    """A streamed message as the openai client accumulates it: string fields concatenated, tool calls
    by index (so an id or name sent twice would show)."""
    content, reasoning, calls = "", "", {}
    for d in deltas:
        assert d.get("reasoning") == d.get("reasoning_content")
        content += d.get("content", "")
        reasoning += d.get("reasoning", "")
        for piece in d.get("tool_calls", ()):
            call = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
            fn = piece.get("function") or {}
            call["id"] += piece.get("id") or ""
            call["name"] += fn.get("name") or ""
            call["arguments"] += fn.get("arguments") or ""
    return {"content": content, "reasoning": reasoning, "tool_calls": [calls[i] for i in sorted(calls)]}


def calls_of(message: dict) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", ())]


# --- whole outputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hermes", "llama3_json", "qwen3+hermes", "deepseek_r1", "harmony_call",
                                  "harmony_final"])
def test_plan_full_splits_content_reasoning_and_tool_calls(outputs: dict[str, Output], name: str) -> None:
    out = outputs[name]
    message, reason = full(out)
    assert message["role"] == "assistant"
    assert (message["content"], message.get("reasoning"), calls_of(message), reason) == (
        out.content, out.reasoning, out.calls, out.reason)
    assert message.get("reasoning_content") == message.get("reasoning")
    ids = [c["id"] for c in message.get("tool_calls", ())]
    assert all(ids) and len(set(ids)) == len(ids)
    assert all(c["type"] == "function" for c in message.get("tool_calls", ()))


def test_plan_full_without_tools_leaves_hermes_markup_as_content(outputs: dict[str, Output]) -> None:
    message, reason = full(outputs["hermes"], CHAT)
    assert (message, reason) == ({"role": "assistant", "content": "Let me check." + CALL_W + CALL_A}, "stop")


def test_plan_full_include_reasoning_false_drops_the_reasoning(outputs: dict[str, Output]) -> None:
    out = outputs["qwen3+hermes"]
    message, _ = full(out, out.body | {"include_reasoning": False})
    assert "reasoning" not in message and "reasoning_content" not in message
    assert (message["content"], calls_of(message)) == (out.content, out.calls)


# --- streams ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", CHUNKINGS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("name", ["hermes", "llama3_json", "qwen3+hermes", "deepseek_r1", "harmony_call",
                                  "harmony_final"])
def test_plan_delta_assembles_to_the_full_parse(outputs: dict[str, Output], name: str,
                                                sizes: tuple[int, ...]) -> None:
    out = outputs[name]
    deltas, reason = stream(out, sizes)
    got = assemble(deltas)
    assert got["content"] == (out.content or "")
    assert got["reasoning"] == (out.reasoning or "")
    assert [(c["name"], c["arguments"]) for c in got["tool_calls"]] == out.calls
    assert all(c["id"].startswith("chatcmpl-tool-") for c in got["tool_calls"])  # one id per call, sent once
    assert reason == out.reason


def test_plan_delta_with_include_reasoning_false_streams_no_reasoning(outputs: dict[str, Output]) -> None:
    out = outputs["qwen3+hermes"]
    deltas, _ = stream(out, (2,), out.body | {"include_reasoning": False})
    assert not any("reasoning" in d for d in deltas)
    assert assemble(deltas)["content"] == out.content


# --- finish reasons -----------------------------------------------------------------------------------
@pytest.mark.parametrize("choice, worker, expected", [
    ("auto", "stop", "tool_calls"),
    ("auto", "length", "length"),
    ("required", "stop", "tool_calls"),
    ("required", "length", "length"),
    (NAMED, "stop", "stop"),
    (NAMED, "length", "length"),
])
def test_plan_finish_reason_follows_the_tool_choice(hermes: ChatFeatures, smol: RouterTokenizer, choice: Any,
                                                     worker: str, expected: str) -> None:
    out = hermes_output(hermes, smol, CALL_W, TOOL_CHAT | {"tool_choice": choice})
    message, reason = full(out, worker_reason=worker)
    assert calls_of(message) == [("get_weather", W_ARGS)] and reason == expected
    if choice != "auto":
        assert message["content"] == ""  # a forced call's message has content "", as vLLM's
    assert stream(out, (3,), worker_reason=worker)[1] == expected


def test_plan_finish_reason_without_calls_is_the_workers(outputs: dict[str, Output]) -> None:
    plan = plan_of(outputs["hermes"].features, TOOL_CHAT)
    assert plan.finish_reason("stop", False) == "stop"
    assert plan.finish_reason("length", False) == "length"
    assert plan.finish_reason("abort", False) == "stop"
    assert plan_of(outputs["hermes"].features, TOOL_CHAT | {"tool_choice": "required"}).finish_reason(
        "stop", False) == "tool_calls"


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_plan_finish_reason_of_an_output_cut_in_a_call_is_length_whole_or_streamed(
        hermes: ChatFeatures, smol: RouterTokenizer, choice: str) -> None:
    """max_tokens cut the second call: the whole parse finds no call (vLLM's hermes parser gives up on
    the broken JSON), the stream has sent the first; both say "length", not "tool_calls"."""
    text = CALL_W + '<tool_call>\n{"name": "add", "arguments": {"a": 1'
    out = hermes_output(hermes, smol, text, TOOL_CHAT | {"tool_choice": choice})
    message, reason = full(out, worker_reason="length")
    assert reason == "length" and "tool_calls" not in message
    deltas, reason = stream(out, (2,), worker_reason="length")
    assert reason == "length" and assemble(deltas)["tool_calls"][0]["name"] == "get_weather"


# --- parallel_tool_calls=false ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hermes", "llama3_json"])
def test_plan_parallel_tool_calls_false_keeps_the_first_call(outputs: dict[str, Output], name: str) -> None:
    out = outputs[name]
    body = out.body | {"parallel_tool_calls": False}
    message, reason = full(out, body)
    assert calls_of(message) == out.calls[:1] and reason == "tool_calls"
    for sizes in CHUNKINGS:
        deltas, reason = stream(out, sizes, body)
        assert [(c["name"], c["arguments"]) for c in assemble(deltas)["tool_calls"]] == out.calls[:1]
        assert reason == "tool_calls"


# --- an agent's next step -----------------------------------------------------------------------------
def test_plan_agent_step_reuses_the_whole_previous_prompt(hermes: ChatFeatures,
                                                          smol: RouterTokenizer) -> None:
    """The tool call the router returns, sent back by the client with the tool's result, renders (with
    the built-in chatml-tools template) as the last prompt + the model's output + its end token: the
    next step's prompt extends the last one token for token (a prefix-cache hit)."""
    messages = [{"role": "system", "content": "Be brief."}] + USER
    body = {"model": "m", "messages": messages, "tools": TOOLS}
    plan = plan_of(hermes, body)
    prompt = smol.encode_chat_sync(hermes.history(parse("chat", body).messages), plan.tools, hermes.template)
    output = "Let me check." + CALL_W
    out_ids = smol.hf.encode(output, add_special_tokens=False)
    message, reason = plan.full(output, out_ids, "stop")
    assert reason == "tool_calls"
    call = message["tool_calls"][0]
    result = {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}
    body2 = body | {"messages": messages + [message, result]}
    plan2 = plan_of(hermes, body2)
    history2 = hermes.history(parse("chat", body2).messages)
    text2 = smol.render_chat(history2, plan2.tools, hermes.template)
    prompt2 = smol.encode_chat_sync(history2, plan2.tools, hermes.template)
    assert prompt2[:len(prompt) + len(out_ids) + 1] == prompt + out_ids + list(smol.eos_token_ids)
    assert text2.endswith("<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
