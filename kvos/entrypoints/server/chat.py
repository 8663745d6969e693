"""POST /v1/chat/completions: messages -> the model's chat template -> one prompt -> n replies.

The template writes the special tokens itself, so its text is encoded without
adding a BOS. Like OpenAI, an unset max_tokens means "up to the end of the
context". A stream opens each choice with a role delta, then content deltas,
then an empty delta carrying the finish reason.

With tools, a reply that is a call (see `kvos.structured.tools`) becomes
`message.tool_calls` and finish reason "tool_calls". A streamed reply cannot
be told from a call until it ends, so with tools in play a choice's text is
held back and sent at its end: as one content delta, or as tool-call deltas
(per call, its id and name, then its arguments), each with the call's `index`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvos.entrypoints.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    FunctionCallOut,
    ProtocolError,
    ToolCallOut,
    TopLogprob,
    UsageInfo,
    parse_request,
)
from kvos.entrypoints.server.plumbing import Job, Serving, finite
from kvos.entrypoints.server.streaming import SSE_DONE, EventStream, deltas, guarded, sse
from kvos.outputs import CompletionOutput, TokenLogprob
from kvos.structured.tools import ToolCall, ToolPlan, parse_calls


class Chat:
    """The /v1/chat/completions handler."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def create(self, request: Request) -> Response:
        serving = self.serving
        req = parse_request(ChatCompletionRequest, await serving.read_json(request))
        serving.check_model(req.model)
        tokenizer = serving.tokenizer
        tools = req.tool_plan()
        try:
            text = await asyncio.to_thread(tokenizer.apply_chat_template, req.conversation(tools), True)
        except ValueError as exc:  # the template refused the conversation (e.g. roles out of order)
            raise ProtocolError(400, str(exc), param="messages", code="invalid_value") from exc
        ids = await asyncio.to_thread(tokenizer.encode, text, False)
        requested = req.requested_max_tokens()
        max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = req.to_sampling_params(default_max_tokens=max(1, serving.engine.max_model_len - len(ids)))
        await serving.check_grammar(params)
        serving.check_context(len(ids), 0 if requested is None else params.max_tokens, "messages", max_tokens_param)
        session, tenant = serving.session(request, req.session_id, req.user)
        job = await serving.start_job(
            "chatcmpl", [ids], params, "messages", req.priority, tenant, req.cache_salt, session
        )
        if req.stream:
            return EventStream(guarded(self._events(job, req, tools), job), lambda: serving.close_job(job))
        finals = await serving.run_to_end(request, job)
        if finals is None:
            return Response(status_code=499)
        choices = []
        for c in finals[0].outputs:
            calls = _calls(c, tools)
            message = ChatResponseMessage(content=None if calls else c.text, tool_calls=[_call_out(t) for t in calls])
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=self._logprobs(c.logprobs) if c.logprobs is not None else None,
                    finish_reason="tool_calls" if calls else c.finish_reason,
                )
            )
        response = ChatCompletionResponse(
            id=job.request_id, created=job.created, model=serving.model_name, choices=choices, usage=job.usage()
        )
        body = response.model_dump()
        for choice in body["choices"]:
            if not choice["message"]["tool_calls"]:  # OpenAI leaves the field out of a text reply
                del choice["message"]["tool_calls"]
        return JSONResponse(body)

    async def _events(self, job: Job, req: ChatCompletionRequest, tools: ToolPlan | None) -> AsyncGenerator[str, None]:
        model = self.serving.model_name
        exclude = None if req.include_usage else {"usage"}

        def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
            return sse(
                ChatCompletionChunk(id=job.request_id, created=job.created, model=model, choices=choices, usage=usage),
                exclude,
            )

        for index in range(job.params.n):
            yield chunk([ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})])
        async for index, c, text, logprobs in deltas(job):
            if tools is not None:
                if not c.finished:  # held back until the choice ends: it may be a call
                    continue
                calls = _calls(c, tools)
                if calls:
                    for i, call in enumerate(calls):
                        for delta in _call_deltas(i, call):
                            yield chunk([ChatChunkChoice(index=index, delta={"tool_calls": [delta]})])
                    yield chunk([ChatChunkChoice(index=index, delta={}, finish_reason="tool_calls")])
                    continue
                text, logprobs = c.text, c.logprobs or []
            delta = {"content": text} if text else {}
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=c.finish_reason)
            if req.logprobs:
                choice.logprobs = self._logprobs(logprobs)
            yield chunk([choice])
        if req.include_usage:
            yield chunk([], job.usage())
        yield SSE_DONE

    def _logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        """The chat format: one entry per token with its UTF-8 bytes and top alternatives."""
        token_text = self.serving.token_text
        content = []
        for lp in logprobs:
            token = token_text(lp.token_id)
            top = [
                TopLogprob(token=(alt := token_text(t)), logprob=finite(v), bytes=list(alt.encode()))
                for t, v in lp.top.items()
            ]
            content.append(
                ChatTokenLogprob(token=token, logprob=finite(lp.logprob), bytes=list(token.encode()), top_logprobs=top)
            )
        return ChatLogprobs(content=content)


def _calls(output: CompletionOutput, tools: ToolPlan | None) -> list[ToolCall]:
    """The calls a finished choice makes; a reply cut short (length, abort) is never a call."""
    if tools is None or output.finish_reason != "stop":
        return []
    return parse_calls(output.text, tools) or []


def _call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


def _call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    """OpenAI's two kinds of tool-call delta: the call's id and name, then its arguments."""
    return [
        {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}},
        {"index": index, "function": {"arguments": call.arguments}},
    ]
