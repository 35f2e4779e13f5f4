"""The part of chat parsing that touches vLLM (imported by ``ChatFeatures.load``, in a thread).

Foreign errors become ``BadRequest`` here, at the boundary: pydantic's validation errors of vLLM's
request model, vLLM's own validation errors, and a parser that fails on a request's tools.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError as PydanticError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls
from vllm.exceptions import VLLMValidationError

from kvrelay.router.chat_parsing import ChatPlan
from kvrelay.router.errors import BadRequest
from kvrelay.schemas.messages import StructuredSpec

# the fields of a chat body that shape tools, reasoning and the output format; the rest is ours
_FIELDS = ("model", "messages", "tools", "tool_choice", "parallel_tool_calls", "response_format",
           "include_reasoning", "chat_template_kwargs")


def _bad(exc: PydanticError) -> BadRequest:
    errors = exc.errors()
    err = errors[0] if errors else {}
    loc = [str(p) for p in err.get("loc", ())]
    msg = err.get("msg", str(exc))
    return BadRequest(f"'{'.'.join(loc)}': {msg}" if loc else msg, param=loc[0] if loc else None)


def make_plan(body: dict[str, Any], parser_cls: Any, tokenizer: Any, auto_tools: bool) -> ChatPlan:
    """Validate ``body`` with vLLM's request model and build the request's plan (400 on bad input)."""
    try:
        request = ChatCompletionRequest.model_validate({k: body[k] for k in _FIELDS if k in body})
    except PydanticError as exc:
        raise _bad(exc) from exc
    except VLLMValidationError as exc:
        raise BadRequest(str(exc), param=exc.parameter) from exc
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    _check_format(request)
    choice = request.tool_choice
    if request.tools and choice == "auto" and not auto_tools:
        raise BadRequest('tool_choice "auto" needs a tool parser: this server runs without one '
                         '(router.chat.tool_call_parser)', param="tool_choice")
    if request.tools and choice not in (None, "none") and parser_cls is None:
        raise BadRequest("tools need a tool parser: this server runs without one "
                         "(router.chat.tool_call_parser)", param="tools")
    parser = None
    if parser_cls is not None:
        try:
            parser = parser_cls(tokenizer, request.tools)
            request = parser.adjust_request(request)
        except (VLLMValidationError, ValueError, TypeError) as exc:
            raise BadRequest(f"the tools or tool_choice cannot be used: {exc}", param="tools") from exc
    try:
        params = request.extract_structured_outputs()
    except (VLLMValidationError, ValueError) as exc:
        raise BadRequest(f"response_format: {exc}", param="response_format") from exc
    tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
    return ChatPlan(request, parser, auto_tools, structured_spec(params), bool(request.skip_special_tokens),
                    tools)


def _check_format(request: ChatCompletionRequest) -> None:
    """``response_format`` on its own, before a tool parser folds it into the tools' constraint (its
    errors would then read as the tools')."""
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None \
            and fmt.json_schema.json_schema is None:
        raise BadRequest("response_format: json_schema needs a 'schema' (the JSON schema of the output)",
                         param="response_format")
    try:
        request.extract_structured_outputs()
    except (VLLMValidationError, ValueError) as exc:
        raise BadRequest(f"response_format: {exc}", param="response_format") from exc


def structured_spec(params: Any) -> StructuredSpec | None:
    """vLLM's ``StructuredOutputsParams`` as the wire's ``StructuredSpec``."""
    if params is None:
        return None
    schema = params.json
    return StructuredSpec(
        json=None if schema is None else (schema if isinstance(schema, str) else json.dumps(schema)),
        json_object=bool(params.json_object), regex=params.regex,
        choice=list(params.choice) if params.choice is not None else None, grammar=params.grammar,
        structural_tag=params.structural_tag, disable_any_whitespace=bool(params.disable_any_whitespace),
        disable_additional_properties=bool(params.disable_additional_properties))


def parse_full(plan: ChatPlan, text: str, token_ids: list[int]) -> tuple[dict[str, Any], bool]:
    """The assistant message of a whole output; True when it holds tool calls."""
    request, parser = plan.request, plan.parser
    if parser is None:
        return {"role": "assistant", "content": text}, False
    if plan.prompt_token_ids is not None:
        parser.set_prompt_token_ids(plan.prompt_token_ids)
    reasoning, content, calls = parser.parse(text, request, enable_auto_tools=plan.auto_tools,
                                             model_output_token_ids=token_ids)
    if not request.include_reasoning:
        reasoning = None
    calls = maybe_filter_parallel_tool_calls(list(calls or []), request) if request.tools else []
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = message["reasoning"] = reasoning
    if calls:
        message["tool_calls"] = [{"id": c.id or _call_id(), "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        if plan.named or plan.required:
            message["content"] = content or ""
    return message, bool(calls)


def _call_id() -> str:
    from vllm.renderers.chat_utils import make_tool_call_id

    return make_tool_call_id()


def parse_delta(plan: ChatPlan, text: str, token_ids: list[int], finished: bool) -> dict[str, Any] | None:
    """One streamed chunk through the request's parser, as OpenAI delta fields."""
    parser, request = plan.parser, plan.request
    if parser is None:
        return {"content": text} if text else None
    dm = parser.parse_delta(text, list(token_ids), request, prompt_token_ids=plan.prompt_token_ids,
                            finished=finished)
    if dm is None:
        return None
    if request.tools:
        dm = maybe_filter_parallel_tool_calls(dm, request)
    out: dict[str, Any] = {}
    if dm.content:
        out["content"] = dm.content
    if dm.reasoning:
        out["reasoning_content"] = out["reasoning"] = dm.reasoning
    if dm.tool_calls:
        out["tool_calls"] = [tc.model_dump(exclude_none=True) for tc in dm.tool_calls]
    return out or None
