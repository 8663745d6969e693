"""Constrained decoding: output that parses as JSON (optionally against a schema), and tool calls.

`StructuredOutput` is the plain data a request carries (in `SamplingParams`) to
the worker; `GrammarCompiler` turns it into an llguidance matcher (compiled once
per schema, cached); `GrammarMatcher` is one request's position in its grammar,
asked for the allowed tokens before each sample and advanced with each token.
`tools` holds the tool-calling format kvos prompts for, constrains and parses.
"""

from kvos.structured.spec import StructuredOutput

__all__ = ["StructuredOutput"]
