"""The OpenAI wire format: request validation, response shapes, error bodies.

Requests are validated strictly (no "5" for 5, no true for 1) because a client
that sends the wrong type has a bug it should hear about. Every problem
becomes a `ProtocolError`, which the server turns into OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`. Ranges are checked once, by
`SamplingParams`, whose `InvalidRequestError` names the field at fault; only
OpenAI's own tighter limits (temperature <= 2, n <= 128, a 64-bit seed) are
declared here. Structured output (`response_format`) and tools (chat only)
become plain data for the engine (`StructuredOutput`, `ToolPlan`); what kvos
cannot honour (the legacy `functions`/`function_call`, tools on
/v1/completions) is refused by name rather than ignored: a client asking for
a function call must not silently get prose.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from kvos.engine.sessions import MAX_SESSION_ID_LEN, SESSION_ID_PATTERN, SessionInfo
from kvos.errors import InvalidRequestError
from kvos.sampling_params import SamplingParams
from kvos.structured.spec import StructuredOutput
from kvos.structured.tools import FunctionTool, ToolPlan, call_schema, calls_text, tool_prompt

# Parameters of several types, with the words an error message should use for them.
_UNION_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}

# A token id as OpenAI writes logit_bias keys. 18 digits keep int() cheap and exceed every vocabulary.
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,18}")


def printable(text: str) -> str:
    """`text` with lone UTF-16 surrogates written as `\\udXXX`, so it can be encoded as UTF-8.

    Error messages echo the client's words (a model name, a field path); a lone
    surrogate in them would make the error body itself unencodable.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ProtocolError(Exception):
    """A request the server refuses, with its HTTP status, OpenAI error fields and response headers."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = printable(message)
        self.type = type
        self.param = None if param is None else printable(param)
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- requests -----------------------------------------------------------------------


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers commonly do, so newer
    # clients that send extra defaults keep working.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


# Fields kvos reads only to refuse: any JSON is parsed (so the refusal can name the field),
# while the schema shows what is served. Anything else is a 400 naming the field.
_NoTools = Annotated[Any, WithJsonSchema(_or_null({"type": "array", "maxItems": 0}))]
_NoToolChoice = Annotated[Any, WithJsonSchema(_or_null({"const": "none"}))]


class JsonSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None
    """Accepted and always honoured: the output is constrained to the schema either way."""


class ResponseFormat(_Request):
    """OpenAI's `response_format`: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput("json_object")
        if self.json_schema is None:
            raise ProtocolError(
                400,
                "Missing required parameter: 'response_format.json_schema'.",
                param="response_format.json_schema",
                code="missing_required_parameter",
            )
        return StructuredOutput.json_schema(self.json_schema.schema_ or {})


class StructuredOutputsParams(_Request):
    """vLLM's `structured_outputs` extension: exactly one constraint.

    Unknown keys are refused, not ignored (a client that asks for a
    constraint kvos does not know must not get unconstrained text).
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    """A JSON schema, as an object or as JSON text."""
    regex: str | None = Field(default=None, min_length=1)
    """Rust regex syntax (llguidance's); the whole output must match."""
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)
    """llguidance's Lark syntax (a `start` rule; `%json {...}` embeds a JSON schema)."""
    json_object: bool | None = None

    def structured(self) -> StructuredOutput:
        given = [
            name
            for name, value in (
                ("json", self.json_),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
                ("json_object", self.json_object or None),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ProtocolError(
                400,
                "structured_outputs needs exactly one of json, regex, choice, grammar or json_object; "
                f"got {', '.join(given) or 'none'}.",
                param="structured_outputs",
                code="invalid_value",
            )
        param = f"structured_outputs.{given[0]}"
        if self.regex is not None:
            return StructuredOutput("regex", param=param, source=self.regex)
        if self.choice is not None:
            return StructuredOutput("choice", param=param, choices=tuple(self.choice))
        if self.grammar is not None:
            return StructuredOutput("grammar", param=param, source=self.grammar)
        if self.json_object:
            return StructuredOutput("json_object", param=param)
        schema = self.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ProtocolError(
                    400, f"structured_outputs.json is not valid JSON: {exc}.", param=param, code="invalid_value"
                ) from exc
            if not isinstance(schema, dict):
                raise ProtocolError(
                    400, "structured_outputs.json must be a JSON schema object.", param=param, code="invalid_value"
                )
        assert isinstance(schema, dict)
        return StructuredOutput.json_schema(schema, param=param)


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    temperature: float | None = Field(default=None, le=2.0)
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(default=None, le=2**63 - 1)
    n: int | None = Field(default=None, le=128)
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    """A vLLM extension: generate exactly max_tokens (benchmarks need fixed output lengths)."""
    user: str | None = None
    """Also the tenant whose fair share the request counts against (`--scheduling-policy fair`)."""
    priority: int = 0
    """A vLLM extension: lower is served sooner (`--scheduling-policy priority`)."""
    cache_salt: str | None = Field(default=None, min_length=1)
    """A vLLM extension: only requests with the same salt share prefix-cache blocks (tenant isolation)."""
    session_id: str | None = Field(
        default=None, min_length=1, max_length=MAX_SESSION_ID_LEN, pattern=SESSION_ID_PATTERN
    )
    """A kvos extension: keep this conversation's KV for its next call (see docs/server.md, Sessions)."""
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(
        default=None, json_schema_extra={"propertyNames": {"pattern": "^[0-9]{1,18}$"}}
    )
    """Token id (as a string, since JSON keys are strings) -> bias in [-100, 100]."""
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    """A vLLM extension: output matching a regex, one of several strings, a Lark grammar or a JSON schema."""
    functions: _NoTools = None
    function_call: _NoToolChoice = None

    def _check_supported(self) -> None:
        """Refuse the legacy function-calling fields rather than answer with plain text."""
        unsupported = [
            ("functions", self.functions not in (None, []), "the legacy function calling (use tools)"),
            ("function_call", self.function_call not in (None, "none"), "function calling"),
        ]
        for param, present, feature in unsupported:
            if present:
                raise ProtocolError(
                    400,
                    f"'{param}' is not supported: kvos does not support {feature} yet.",
                    param=param,
                    code="unsupported_parameter",
                )

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's string keys as token ids; the range of ids and biases is checked downstream."""
        if self.logit_bias is None:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise ProtocolError(
                    400,
                    f"Invalid key for 'logit_bias': {key!r} is not a token id (a non-negative integer string).",
                    param="logit_bias",
                    code="invalid_value",
                )
            bias[int(key)] = value
        return bias

    def _structured(self) -> StructuredOutput | None:
        """The one constraint the request asks for: `response_format` or `structured_outputs`, never both."""
        from_format = None if self.response_format is None else self.response_format.structured()
        if self.structured_outputs is None:
            return from_format
        if from_format is not None:
            raise ProtocolError(
                400,
                "response_format and structured_outputs cannot be combined: send one constraint.",
                param="structured_outputs",
                code="invalid_value",
            )
        return self.structured_outputs.structured()

    def _sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        renames: dict[str, str],
        structured: StructuredOutput | None = None,
    ) -> SamplingParams:
        """Build SamplingParams, reporting its InvalidRequestError against the request's field names."""
        self._check_supported()
        if self.stream_options is not None and not self.stream:
            raise ProtocolError(400, "stream_options is only allowed when stream is true", param="stream_options")
        logit_bias = self._logit_bias()
        try:
            return SamplingParams(
                n=1 if self.n is None else self.n,
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k is None else self.top_k,
                min_p=0.0 if self.min_p is None else self.min_p,
                seed=self.seed,
                stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
                logprobs=logprobs,
                presence_penalty=0.0 if self.presence_penalty is None else self.presence_penalty,
                frequency_penalty=0.0 if self.frequency_penalty is None else self.frequency_penalty,
                ignore_eos=self.ignore_eos,
                logit_bias=logit_bias,
                structured=structured,
            )
        except InvalidRequestError as exc:
            param = renames.get(exc.param, exc.param) if exc.param is not None else None
            if param not in type(self).model_fields:
                param = None
            where = f" for '{param}'" if param else ""
            raise ProtocolError(400, f"Invalid value{where}: {exc}.", param=param, code="invalid_value") from exc

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False
    tools: _NoTools = None
    tool_choice: _NoToolChoice = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) to run: a list of strings or token ids is several prompts."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ProtocolError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        return prompts

    def to_sampling_params(self) -> SamplingParams:
        if self.echo and self.logprobs is not None:
            raise ProtocolError(
                400,
                "echo together with logprobs is not supported (prompt logprobs are not computed)",
                param="echo",
                code="unsupported_value",
            )
        # OpenAI's default for /v1/completions.
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        for param, present in (("tools", self.tools not in (None, [])), ("tool_choice", self.tool_choice)):
            if present not in (None, False, "none"):
                raise ProtocolError(
                    400,
                    f"'{param}' is not supported on /v1/completions: use /v1/chat/completions.",
                    param=param,
                    code="unsupported_parameter",
                )
        return self._sampling_params(max_tokens, self.logprobs, {}, self._structured())


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionSpec(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Request):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class FunctionCallIn(_Request):
    name: str
    arguments: str


class ToolCallIn(_Request):
    """A call the assistant made earlier in the conversation, as the client echoes it back."""

    id: str
    type: Literal["function"]
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_plan(self) -> ToolPlan | None:
        """The tools in play, or None when the model must answer in text (no tools, or tool_choice "none")."""
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ProtocolError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
        if not self.tools or self.tool_choice == "none":
            return None
        tools = tuple(
            FunctionTool(
                t.function.name,
                t.function.description or "",
                json.dumps(t.function.parameters if t.function.parameters is not None else {"type": "object"}),
            )
            for t in self.tools
        )
        if len({t.name for t in tools}) != len(tools):
            raise ProtocolError(400, "tools must have distinct names", param="tools", code="invalid_value")
        parallel = self.parallel_tool_calls is not False
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {t.name for t in tools}:
                raise ProtocolError(
                    400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice", code="invalid_value"
                )
            return ToolPlan(tools, "named", name, parallel)
        return ToolPlan(tools, self.tool_choice or "auto", None, parallel)

    def conversation(self, tools: ToolPlan | None = None) -> list[dict[str, str]]:
        """Messages as the chat template expects them, with the tool block in the system prompt.

        "developer" is OpenAI's new name for "system". Earlier tool calls are
        written as the assistant's text, in the format the model is asked for.
        """
        messages = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            content = m.text()
            if m.tool_calls:
                content = calls_text([(c.function.name, c.function.arguments) for c in m.tool_calls])
            messages.append({"role": role, "content": content})
        if tools is not None:
            block = tool_prompt(tools)
            if messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{block}"}
            else:
                messages.insert(0, {"role": "system", "content": block})
        return messages

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ProtocolError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        requested = self.requested_max_tokens()
        max_tokens = default_max_tokens if requested is None else requested
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        renames = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            renames["max_tokens"] = "max_completion_tokens"
        return self._sampling_params(max_tokens, logprobs, renames, self.chat_structured())

    def chat_structured(self) -> StructuredOutput | None:
        """The response format's grammar, or the call format's when a call is forced (never both)."""
        structured = self._structured()
        tools = self.tool_plan()
        if tools is None:
            return structured
        if structured is not None:
            raise ProtocolError(
                400,
                f"{structured.param.split('.')[0]} cannot be combined with tools "
                "(set tool_choice to 'none' for structured output)",
                param=structured.param.split(".")[0],
                code="unsupported_value",
            )
        return call_schema(tools) if tools.mode in ("required", "named") else None


RequestT = TypeVar("RequestT", bound="_Request")


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """Validate a decoded JSON body, turning the first problem into a ProtocolError."""
    if not isinstance(body, dict):
        raise ProtocolError(400, "the request body must be a JSON object", code="invalid_type")
    _refuse_lone_surrogates(body)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _protocol_error(exc) from exc


def _protocol_error(exc: ValidationError) -> ProtocolError:
    error = exc.errors(include_url=False)[0]
    path = [p for p in error["loc"] if not _is_union_tag(p)]
    param = ".".join(str(p) for p in path) or None
    field = next((p for p in reversed(path) if isinstance(p, str)), None)
    if error["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
        return ProtocolError(400, message, param=param, code="missing_required_parameter")
    if len(error["loc"]) > len(path) and field in _UNION_EXPECTED:
        message = f"Invalid type for '{param}': expected {_UNION_EXPECTED[field]}."
        return ProtocolError(400, message, param=param, code="invalid_type")
    code = "invalid_type" if error["type"].endswith("_type") else "invalid_value"
    return ProtocolError(400, f"Invalid value for '{param}': {error['msg']}.", param=param, code=code)


def _refuse_lone_surrogates(body: dict[str, Any]) -> None:
    """400 naming the first string (key or value) that holds a lone UTF-16 surrogate.

    JSON allows the escape "\\ud800" on its own, but it is not Unicode text: the
    tokenizer cannot encode it, and nothing built from it (an error message, a
    chat template) could be sent back as UTF-8. Walked with an explicit stack, so
    deep nesting cannot exhaust Python's recursion limit.
    """
    stack: list[tuple[str, Any]] = [(key, value) for key, value in reversed(body.items())]
    while stack:
        path, value = stack.pop()
        for text in (path, value) if isinstance(value, str) else (path,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                surrogate = f"\\u{ord(text[exc.start]):04x}"
                raise ProtocolError(
                    400,
                    f"Invalid value for '{path}': it holds a lone UTF-16 surrogate ({surrogate}), "
                    "which is not Unicode text.",
                    param=path,
                    code="invalid_value",
                ) from exc
        if isinstance(value, dict):
            stack.extend((f"{path}.{key}", item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in reversed(list(enumerate(value))))


def _is_union_tag(segment: int | str) -> bool:
    """Unions add a location segment naming the member that failed ('str', 'list[int]', 'TextPart')."""
    if isinstance(segment, int):
        return False
    return not segment.isidentifier() or segment[0].isupper() or segment in ("str", "int", "float", "bool")


# -- responses ----------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every 4xx and 5xx (and as an event when a stream fails)."""

    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int
    """Prompt tokens whose KV was found cached (a session's earlier turns, shared prefixes), not computed."""


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class CompletionResponse(BaseModel):
    """Both the full response and each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str
    """A JSON object as a string, as OpenAI sends it."""


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]
    """{"role": "assistant", "content": ""} first, then {"content": ...} or {"tool_calls": [...]},
    then {} with the finish reason.

    finish_reason "abort" (vLLM's word) ends a request the server cut short while shutting down."""
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvos"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionObject(BaseModel):
    """A session as `GET /v1/sessions` lists it (times in Unix seconds)."""

    id: str
    object: Literal["session"] = "session"
    created: int
    last_used_at: int
    expires_at: int
    num_calls: int
    num_tokens: int
    """Tokens of the conversation as its last finished call left it."""

    @classmethod
    def of(cls, info: SessionInfo) -> SessionObject:
        return cls(
            id=info.session_id,
            created=info.created,
            last_used_at=info.last_used_at,
            expires_at=info.expires_at,
            num_calls=info.num_calls,
            num_tokens=info.num_tokens,
        )


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionObject]


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True
