"""The tools ``kvrelay bench agent``'s agents call between steps, and a loopback HTTP server for them.

Two tools, with parameter schemas tight enough that a 135M model's calls can be checked
(enums, bounded integers, no extra properties):

- ``calculator``: ``{"op": "add" | "mul", "a": int, "b": int}`` (``a``, ``b`` in [-1000, 1000])
  -> ``a + b`` or ``a * b``; computed by a table of functions, never ``eval``;
- ``lookup``: ``{"key": one of LOOKUP's keys}`` -> a fixed value.

``ToolServer`` (aiohttp, 127.0.0.1, a free port) answers ``POST /call`` with
``{"name", "arguments", "pad_words"?, "salt"?}`` after ``latency_ms`` (the tool's own work time):
200 ``{"result": ..., "details": <pad_words words of text>}``, or 400 ``{"error": ...}`` for an
unknown tool or arguments that break its schema. ``details`` is the filler that makes a tool
result a few hundred tokens long (the context an agent's history grows by); it is derived from
the call and ``salt``, so the same call gets the same text in every variant.

Arguments are checked with ``jsonschema`` when it is installed (it is, with vLLM), else with
``check_schema``: the subset of JSON Schema the tools use (object, string, integer, enum,
minimum / maximum, required, additionalProperties false).
"""

from __future__ import annotations

import asyncio
import json
import random
import zlib
from typing import Any

from aiohttp import web

BOUND = 1000
PARAMETERS: dict[str, dict[str, Any]] = {
    "calculator": {"type": "object", "additionalProperties": False, "required": ["op", "a", "b"],
                   "properties": {"op": {"type": "string", "enum": ["add", "mul"]},
                                  "a": {"type": "integer", "minimum": -BOUND, "maximum": BOUND},
                                  "b": {"type": "integer", "minimum": -BOUND, "maximum": BOUND}}},
}
LOOKUP = {"france": "Paris", "japan": "Tokyo", "kenya": "Nairobi", "peru": "Lima", "norway": "Oslo",
          "egypt": "Cairo", "canada": "Ottawa", "india": "New Delhi"}
PARAMETERS["lookup"] = {"type": "object", "additionalProperties": False, "required": ["key"],
                        "properties": {"key": {"type": "string", "enum": sorted(LOOKUP)}}}
DESCRIPTIONS = {"calculator": "Compute a + b (op 'add') or a * b (op 'mul') of two integers.",
                "lookup": "Look up the capital city of a country (lower-case country name)."}
OPS = {"add": lambda a, b: a + b, "mul": lambda a, b: a * b}
# filler words: common English words, about one SmolLM2 token each
WORDS = ("the", "report", "shows", "that", "value", "was", "checked", "against", "records", "from", "last",
         "year", "and", "found", "to", "match", "within", "expected", "range", "for", "each", "region",
         "team", "noted", "small", "changes", "in", "cost", "time", "but", "no", "errors", "were", "seen",
         "during", "review", "of", "data", "sources", "all", "numbers", "are", "final", "after", "second",
         "pass")


def openai_tools() -> list[dict[str, Any]]:
    """The tools as OpenAI function tool definitions (``tools=`` of a chat completion)."""
    return [{"type": "function", "function": {"name": name, "description": DESCRIPTIONS[name],
                                              "parameters": PARAMETERS[name]}} for name in PARAMETERS]


def check_schema(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """The ways ``value`` breaks ``schema`` (the subset of JSON Schema above); [] when it holds."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        errors = [f"{path}: '{k}' is required" for k in schema.get("required", ()) if k not in value]
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: '{k}' is not allowed" for k in value if k not in props]
        for k, sub in props.items():
            if k in value:
                errors += check_schema(value[k], sub, f"{path}.{k}")
        return errors
    if kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        return [f"{path}: not an integer"]
    if kind == "string" and not isinstance(value, str):
        return [f"{path}: not a string"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    if "minimum" in schema and value < schema["minimum"]:
        return [f"{path}: {value} < {schema['minimum']}"]
    if "maximum" in schema and value > schema["maximum"]:
        return [f"{path}: {value} > {schema['maximum']}"]
    return []


def _jsonschema_errors(value: Any, schema: dict[str, Any]) -> list[str] | None:
    try:
        import jsonschema
    except ImportError:
        return None
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]


def validate_arguments(name: str, arguments: Any) -> list[str]:
    """Why a call of tool ``name`` with ``arguments`` (parsed JSON) is invalid; [] when it is valid."""
    schema = PARAMETERS.get(name)
    if schema is None:
        return [f"unknown tool {name!r}"]
    found = _jsonschema_errors(arguments, schema)
    return check_schema(arguments, schema) if found is None else found


def call_tool(name: str, arguments: dict[str, Any]) -> Any:
    """The result of a valid call (``validate_arguments`` found nothing)."""
    if name == "calculator":
        return OPS[arguments["op"]](arguments["a"], arguments["b"])
    return LOOKUP[arguments["key"]]


def filler(n: int, salt: str) -> str:
    """``n`` words of text, the same for the same ``salt``."""
    rng = random.Random(zlib.crc32(salt.encode()))
    return " ".join(rng.choice(WORDS) for _ in range(n))


class ToolServer:
    """Owns the tool HTTP server: ``async with ToolServer(200) as url`` (or ``start`` / ``stop``)."""

    def __init__(self, latency_ms: float = 200.0, host: str = "127.0.0.1", max_pad_words: int = 8192) -> None:
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms!r}")
        self.latency_ms, self.host, self.max_pad_words = latency_ms, host, max_pad_words
        self.calls = 0  # calls answered (valid or not)
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        if self._runner is not None:
            return self.url
        app = web.Application()
        app.router.add_post("/call", self._call)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, 0)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _call(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1e3)  # the tool's own work
        self.calls += 1
        if not isinstance(body, dict):
            return web.json_response({"error": "the body must be a JSON object"}, status=400)
        name, args, pad = body.get("name"), body.get("arguments"), body.get("pad_words", 0)
        if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad <= self.max_pad_words:
            return web.json_response({"error": f"pad_words must be an integer in [0, {self.max_pad_words}]"},
                                     status=400)
        errors = validate_arguments(str(name), args)
        if errors:
            return web.json_response({"error": "; ".join(errors)}, status=400)
        salt = json.dumps([name, args], sort_keys=True) + str(body.get("salt", ""))
        return web.json_response({"result": call_tool(str(name), args), "details": filler(pad, salt)})
