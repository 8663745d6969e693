"""What a request asks its output to be, as plain data that pickles into a step plan."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from kvos.errors import InvalidRequestError

StructuredKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")

_WHAT = {
    "json_object": "the JSON object grammar",
    "json_schema": "the JSON schema",
    "regex": "the regex",
    "choice": "the choice",
    "grammar": "the grammar (llguidance's Lark syntax)",
}


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must be: JSON (any object, or matching `schema`), a regex, one of `choices`, or a grammar.

    `json_object` and `json_schema` come from OpenAI's `response_format`; all
    five from vLLM's `structured_outputs` extension. `source` is the regex
    (`regex`, Rust regex syntax as llguidance reads it, matched in full) or
    the grammar (`grammar`, llguidance's Lark syntax). The schema travels as
    JSON text, not a dict: the dataclass stays hashable (it is the grammar
    cache's key). `param` is the request field to blame when it cannot be compiled.
    """

    kind: StructuredKind
    schema: str | None = None
    param: str = field(default="response_format", compare=False)
    source: str | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequestError(f"unknown structured output kind {self.kind!r}", self.param)
        if (self.kind == "json_schema") != (self.schema is not None):
            raise InvalidRequestError("a schema is needed for json_schema, and only there", self.param)
        if (self.kind in ("regex", "grammar")) != (self.source is not None):
            raise InvalidRequestError(f"a source text is needed for {self.kind}, and only there", self.param)
        if self.kind in ("regex", "grammar") and not self.source:
            raise InvalidRequestError(f"the {self.kind} is empty", self.param)
        if (self.kind == "choice") != bool(self.choices):
            raise InvalidRequestError("choices are needed for choice (at least one), and only there", self.param)
        if not all(isinstance(c, str) for c in self.choices):
            raise InvalidRequestError("every choice must be a string", self.param)

    @property
    def what(self) -> str:
        """How an error message names it."""
        return _WHAT[self.kind]

    @classmethod
    def json_schema(cls, schema: dict[str, Any], param: str = "response_format") -> StructuredOutput:
        """From a schema dict. Keys keep their order: it is the order the grammar asks properties in."""
        return cls("json_schema", json.dumps(schema), param)

    def schema_dict(self) -> dict[str, Any]:
        """The schema llguidance compiles: `json_object` is any JSON object; integers are bounded."""
        if self.schema is None:
            return {"type": "object"}
        if self.kind != "json_schema":
            raise ValueError(f"{self.kind} has no JSON schema")
        value: dict[str, Any] = json.loads(self.schema)
        return _bound_integers(value)


MAX_SAFE_INTEGER = 2**53 - 1
"""JavaScript's `Number.MAX_SAFE_INTEGER`: beyond it JSON parsers that use doubles lose digits."""


def _bound_integers(schema: Any) -> Any:
    """`schema` with every unbounded integer bounded by +-`MAX_SAFE_INTEGER`.

    Unbounded, an integer's grammar never ends, and a small model that starts
    a number at temperature 0 can repeat a digit until max_tokens (SmolLM2 does,
    for a city's population); bounded, it ends after 16 digits. (llguidance
    cannot build the full int64 range.) Walks every nested dict and list, so `$defs`, `items` and
    `properties` are all covered.
    """
    if isinstance(schema, list):
        return [_bound_integers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: _bound_integers(item) for key, item in schema.items()}
    if bounded.get("type") == "integer":
        if "minimum" not in bounded and "exclusiveMinimum" not in bounded:
            bounded["minimum"] = -MAX_SAFE_INTEGER
        if "maximum" not in bounded and "exclusiveMaximum" not in bounded:
            bounded["maximum"] = MAX_SAFE_INTEGER
    return bounded
