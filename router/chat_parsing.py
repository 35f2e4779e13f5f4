"""Tools, reasoning and structured outputs on chat requests, by vLLM's own request model and parsers.

kvrelay parses no model text itself. A chat request that carries ``tools``, ``tool_choice`` or a
``response_format`` (or any chat request, when a reasoning parser is configured) is validated by
vLLM's ``ChatCompletionRequest``; vLLM's ``Parser`` (``vllm.parser``: the tool parser named by
``router.chat.tool_call_parser`` composed with the reasoning parser, as ``vllm serve`` builds it
from ``--tool-call-parser`` / ``--reasoning-parser``) adjusts it (``tool_choice="required"`` and
named tools become a structured-output constraint) and later splits the output into reasoning,
content and tool calls, streamed or whole. The constraint travels to the workers as a
``StructuredSpec`` (every engine that samples a token of the request applies it).

The responses follow vLLM's server (``vllm/entrypoints/openai/chat_completion/serving.py``):
``finish_reason`` is ``"tool_calls"`` when the tool parser found calls (``tool_choice`` auto) or
``tool_choice="required"`` stopped normally; a named tool's call finishes with ``"stop"``; an
output cut at ``max_tokens`` keeps ``"length"`` (as vLLM's streamed responses do);
``parallel_tool_calls=false`` keeps the first call. Reasoning is returned as ``reasoning_content``
(DeepSeek's name, read by most clients) and ``reasoning`` (vLLM's).

vLLM's modules take seconds to import: ``ChatFeatures.load`` imports them in a thread once, at
router start when a parser is configured, else at the first request that needs them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kvrelay.base.logs import get_logger
from kvrelay.router.chat_templates import BUILTIN, load_template
from kvrelay.router.config import ChatConfig
from kvrelay.router.errors import BadRequest
from kvrelay.schemas.messages import StructuredSpec

log = get_logger(__name__)

LOAD_TIMEOUT_S = 300.0  # importing vLLM's serving modules on a loaded 2-core machine
_KEYS = ("tools", "tool_choice", "response_format")
HARMONY_TOOL_PARSERS = ("openai",)  # vLLM's GptOssToolParser
HARMONY_REASONING_PARSERS = ("openai_gptoss",)  # vLLM's GptOssReasoningParser


def effective(name: str) -> str:
    """A parser / template setting as the router reads it: "auto" left unresolved means none."""
    return "" if name == "auto" else name


class ChatFeatures:
    """The router's tool and reasoning parsing: vLLM's parser class for the served model."""

    def __init__(self, cfg: ChatConfig, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.tool_parser = effective(cfg.tool_call_parser)
        self.reasoning_parser = effective(cfg.reasoning_parser)
        template = effective(cfg.chat_template)
        self.template = load_template(template)  # None: the model's own
        # the built-in templates print history tool-call arguments as sent (the text the model wrote)
        self.arguments_as_objects = template not in BUILTIN
        self._parser_cls: Any = None
        self._loaded: asyncio.Future[None] | None = None

    @property
    def configured(self) -> bool:
        return bool(self.tool_parser or self.reasoning_parser)

    @property
    def harmony(self) -> bool:
        """gpt-oss's parsers ("openai", "openai_gptoss") are stubs that parse only inside vLLM's
        ``HarmonyParser`` (vLLM's server picks it by the model type gpt_oss): naming one means harmony."""
        return self.tool_parser in HARMONY_TOOL_PARSERS or self.reasoning_parser in HARMONY_REASONING_PARSERS

    def wanted(self, body: dict[str, Any]) -> bool:
        """Whether this chat body needs a plan (parsing or a constraint)."""
        if self.reasoning_parser:
            return True
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "text":
            fmt = None
        return bool(body.get("tools")) or body.get("tool_choice") is not None or fmt is not None

    def preload(self) -> None:
        """Start importing vLLM now, when a parser is configured (requests need it then)."""
        if self.configured and self._loaded is None:
            self._loaded = asyncio.ensure_future(asyncio.to_thread(self._load_sync))
            self._loaded.add_done_callback(_log_failure)

    def history(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages as the template takes them."""
        return tool_call_arguments_as_objects(messages) if self.arguments_as_objects else messages

    async def load(self) -> None:
        """Import vLLM's request model and parsers (once; in a thread)."""
        if self._loaded is None:
            self._loaded = asyncio.ensure_future(asyncio.to_thread(self._load_sync))
        try:
            await asyncio.wait_for(asyncio.shield(self._loaded), LOAD_TIMEOUT_S)
        except ImportError as exc:
            raise BadRequest(f"tools, reasoning and response_format need vLLM in the router's "
                             f"environment: {exc}", code="unsupported") from exc

    def _load_sync(self) -> None:
        from vllm.parser.parser_manager import ParserManager

        from kvrelay.router import chat_vllm  # noqa: F401  (vLLM's request model, imported here once)

        if self.configured:
            self._parser_cls = ParserManager.get_parser(
                tool_parser_name=self.tool_parser or None, reasoning_parser_name=self.reasoning_parser or None,
                enable_auto_tools=bool(self.tool_parser), tool_strict_level=self.cfg.tool_strict_level,
                is_harmony=self.harmony, tokenizer=self.tokenizer)
        log.info("chat_parsing_loaded", tool_parser=self.tool_parser, reasoning_parser=self.reasoning_parser)

    async def plan(self, body: dict[str, Any]) -> ChatPlan:
        """Validate the tool / format fields of a chat body and make its per-request plan."""
        await self.load()
        from kvrelay.router.chat_vllm import make_plan

        plan = make_plan(body, self._parser_cls, self.tokenizer, bool(self.tool_parser))
        if self.cfg.exclude_tools_when_tool_choice_none and plan.request.tool_choice == "none":
            plan.tools = None
        if self.cfg.compact_json and plan.structured is not None:
            plan.structured = compact(plan.structured)
        return plan


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("chat_parsing_load_failed", error=repr(fut.exception()))


class ChatPlan:
    """One request's constraint, template inputs and output parsing. Built by ``chat_vllm.make_plan``."""

    def __init__(self, request: Any, parser: Any, auto_tools: bool, structured: StructuredSpec | None,
                 skip_special_tokens: bool, tools: list[dict[str, Any]] | None) -> None:
        self.request, self.parser, self.auto_tools = request, parser, auto_tools
        self.structured, self.skip_special_tokens, self.tools = structured, skip_special_tokens, tools
        self.prompt_token_ids: list[int] | None = None
        self.tools_streamed = False

    @property
    def named(self) -> str | None:
        choice = self.request.tool_choice
        function = getattr(choice, "function", None)
        return getattr(function, "name", None)

    @property
    def required(self) -> bool:
        return self.request.tool_choice == "required"

    def finish_reason(self, worker_reason: str | None, tools_called: bool) -> str:
        """OpenAI's finish reason, as vLLM's server gives it."""
        reason = worker_reason if worker_reason in ("stop", "length") else "stop"
        if reason == "length":  # cut off: said so, whatever was parsed before the cut
            return reason
        if (tools_called and not self.named and self.auto_tools) or (self.required and reason == "stop"):
            return "tool_calls"
        return reason

    def full(self, text: str, token_ids: list[int], worker_reason: str | None) -> tuple[dict[str, Any], str]:
        """The assistant message of a whole output, and its finish reason."""
        from kvrelay.router.chat_vllm import parse_full

        message, called = parse_full(self, text, token_ids)
        return message, self.finish_reason(worker_reason, called)

    def delta(self, text: str, token_ids: list[int], finished: bool) -> dict[str, Any] | None:
        """The delta fields (content, reasoning, tool_calls) of one streamed chunk; None: nothing yet."""
        from kvrelay.router.chat_vllm import parse_delta

        delta = parse_delta(self, text, token_ids, finished)
        if delta and delta.get("tool_calls"):
            self.tools_streamed = True
        return delta


def compact(spec: StructuredSpec) -> StructuredSpec:
    """JSON without runs of whitespace: ``disable_any_whitespace`` for a JSON constraint; for a
    structural tag (tool calls), at most one whitespace character in a row inside each JSON content
    (xgrammar's ``max_whitespace_cnt``)."""
    if spec.json is not None or spec.json_object:
        return spec.replace(disable_any_whitespace=True)
    if spec.structural_tag is None:
        return spec
    tag = json.loads(spec.structural_tag)
    _limit_whitespace(tag)
    return spec.replace(structural_tag=json.dumps(tag))


def _limit_whitespace(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "json_schema" and node.get("max_whitespace_cnt") is None:
            node["max_whitespace_cnt"] = 1
        for value in node.values():
            _limit_whitespace(value)
    elif isinstance(node, list):
        for value in node:
            _limit_whitespace(value)


def tool_call_arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History tool calls with their JSON ``arguments`` text as objects, as chat templates expect
    (vLLM's renderer does the same); arguments that are not a JSON object stay text."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for call in calls:
                fn = dict(call.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        parsed = json.loads(args)
                    except ValueError:
                        parsed = None
                    if isinstance(parsed, dict):
                        fn["arguments"] = parsed
                fixed.append({**call, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
