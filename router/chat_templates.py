"""Chat templates kvrelay ships, by name (``router.chat.chat_template``).

``chatml-tools``: SmolLM2's ChatML template (the one its tokenizer carries) extended with tools in
the Hermes format, so ``kvrelay up`` with SmolLM2 or the tiny model serves tool calls parsed by
vLLM's ``hermes`` tool parser. The tools are listed in the system turn; an assistant's tool calls
render as ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (what the structured-output
grammar of ``tool_choice="required"`` / a named tool makes the model write); a tool's result is a
user turn in ``<tool_response>`` tags. A history renders to the text the model produced (same
newlines), so an agent's next step shares its whole prefix with the last one: a prefix-cache hit.
"""

from __future__ import annotations

from pathlib import Path

# Every newline is printed by an expression: transformers renders templates with trim_blocks and
# lstrip_blocks, which drop a newline written as text right after a {% tag %} (and {%- strips the
# text before it), so text newlines next to tags would vanish ("<|im_end|><|im_start|>user").
CHATML_TOOLS = (
    "{%- set default_system = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set system = default_system -%}{%- set rest = messages -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}{{ '\\n\\nYou may call one or more functions to assist with the user query. You are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' }}{{ (tool.function if tool.function is defined else tool) | tojson }}"
    "{%- endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call>' }}{%- endif %}{{ '<|im_end|>\\n' }}"
    "{%- for message in rest %}"
    "{%- if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{{ message['content'] or '' }}"
    "{%- for call in message.get('tool_calls') or [] %}{%- set fn = call.function %}"
    "{{ '<tool_call>\\n{\"name\": \"' }}{{ fn.name }}{{ '\", \"arguments\": ' }}"
    "{%- if fn.arguments is string %}{{ fn.arguments }}{% else %}{{ fn.arguments | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' }}{{ message['content'] }}"
    "{{ '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' }}{{ message['content'] }}{{ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN = {"chatml-tools": CHATML_TOOLS}


class ChatTemplateError(ValueError):
    """``router.chat.chat_template`` names no built-in template and no readable file."""


def load_template(spec: str) -> str | None:
    """The template text for ``spec``: "" = the model's own (None), a built-in name, or a file path."""
    if not spec:
        return None
    if spec in BUILTIN:
        return BUILTIN[spec]
    try:
        return Path(spec).read_text()
    except OSError as exc:
        raise ChatTemplateError(f"router.chat.chat_template: {spec!r} is not one of {sorted(BUILTIN)} and "
                                f"not a readable file: {exc}") from exc
