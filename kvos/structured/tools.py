"""Tool calling in one format kvos prompts for, constrains and parses, whatever the model.

The tools are described in a system-prompt block (`tool_prompt`), and a call
is written as a JSON array of `{"name": ..., "arguments": {...}}` objects,
nothing else:

    [{"name": "get_weather", "arguments": {"city": "Paris"}}]

With `tool_choice` "required" or a named function the output is constrained to
exactly that array (`call_schema`), each item's arguments to its function's
JSON schema. With "auto" the model chooses, and `parse_calls` recognises a
reply that is such an array. Earlier calls in a conversation are written back
into the prompt in the same format (`calls_text`), so the model sees its own
convention. One format for every model keeps the parser small; a model whose
chat template has a tool convention of its own would read its native format
better (see docs/structured_output.md).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from kvos.structured.spec import StructuredOutput

ToolChoiceMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call; `parameters` is the JSON schema of its arguments, as JSON text."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object"}'


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: OpenAI's shape, with the arguments as a JSON string."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools: which, whether a call is forced, how many at once."""

    tools: tuple[FunctionTool, ...]
    mode: ToolChoiceMode
    named: str | None = None
    parallel: bool = True

    @property
    def callable_tools(self) -> tuple[FunctionTool, ...]:
        return tuple(t for t in self.tools if self.named is None or t.name == self.named)


def tool_prompt(plan: ToolPlan) -> str:
    """The system-prompt block that lists the functions and the call format."""
    lines = ["You can call these functions (arguments follow each one's JSON schema):"]
    for tool in plan.callable_tools:
        description = f": {tool.description}" if tool.description else ""
        lines.append(f"- {tool.name}{description}. Arguments schema: {tool.parameters}")
    lines.append(
        "To call functions, reply with only a JSON array of calls and nothing else: "
        '[{"name": "<function name>", "arguments": {<arguments>}}]'
    )
    if plan.mode == "auto":
        lines.append("If no function is needed, answer in plain text.")
    else:
        lines.append("You must call a function now.")
    return "\n".join(lines)


def call_schema(plan: ToolPlan) -> StructuredOutput:
    """The grammar of a forced call: an array of one call (or more, if parallel) of the allowed functions."""
    items = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": json.loads(tool.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in plan.callable_tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items}}
    schema["minItems"] = 1
    if not plan.parallel or plan.named is not None:
        schema["maxItems"] = 1
    return StructuredOutput.json_schema(schema, param="tools")


def parse_calls(text: str, plan: ToolPlan) -> list[ToolCall] | None:
    """The calls `text` makes, or None when it is a plain answer.

    A call names one of the request's tools and gives an object of arguments;
    a reply that only looks like JSON is left as content. Without parallel
    calls only the first call is kept.
    """
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    names = {t.name for t in plan.callable_tools}
    if not items or not all(
        isinstance(item, dict) and item.get("name") in names and isinstance(item.get("arguments", {}), dict)
        for item in items
    ):
        return None
    if not plan.parallel:
        items = items[:1]
    return [
        ToolCall(f"call_{uuid.uuid4().hex[:24]}", item["name"], json.dumps(item.get("arguments", {}))) for item in items
    ]


def calls_text(calls: list[tuple[str, str]]) -> str:
    """Earlier calls ((name, arguments JSON) pairs) written back into a prompt in the format above."""
    return json.dumps([{"name": name, "arguments": _arguments(arguments)} for name, arguments in calls])


def _arguments(arguments: str) -> Any:
    """A client echoes back the arguments string it got; one that is not JSON is kept as a string."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
