"""POST /v1/completions: one or several prompts (text or token ids) -> text, whole or streamed.

A list of prompts is one API call of several engine requests; choice `i`
of prompt `p` is choice `p * n + i` of the response, as OpenAI numbers them.
Logprobs come in the legacy format (parallel lists with character offsets).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvos.entrypoints.openai_protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    parse_request,
)
from kvos.entrypoints.server.plumbing import Job, Serving, finite
from kvos.entrypoints.server.streaming import SSE_DONE, EventStream, deltas, guarded, sse
from kvos.outputs import TokenLogprob


class Completions:
    """The /v1/completions handler."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def create(self, request: Request) -> Response:
        serving = self.serving
        req = parse_request(CompletionRequest, await serving.read_json(request))
        serving.check_model(req.model)
        params = req.to_sampling_params()
        await serving.check_grammar(params)
        prompts = req.prompts()
        tokenizer = serving.tokenizer
        prompt_ids = [await asyncio.to_thread(tokenizer.encode, p) if isinstance(p, str) else p for p in prompts]
        for ids in prompt_ids:
            serving.check_context(len(ids), params.max_tokens, "prompt", "max_tokens")
        session, tenant = serving.session(request, req.session_id, req.user)
        job = await serving.start_job(
            "cmpl", prompt_ids, params, "prompt", req.priority, tenant, req.cache_salt, session
        )
        if req.echo:
            # Decoded only now: the engine has checked that the ids are in its vocabulary.
            job.prompt_texts = [
                p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False) for p in prompts
            ]
        if req.stream:
            return EventStream(guarded(self._events(job, req), job), lambda: serving.close_job(job))
        finals = await serving.run_to_end(request, job)
        if finals is None:
            return Response(status_code=499)
        choices = [
            CompletionChoice(
                index=job.choice_index(i, c),
                text=(job.prompt_texts[i] if req.echo else "") + c.text,
                logprobs=self._logprobs(c.logprobs, 0) if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
            )
            for i, output in enumerate(finals)
            for c in output.outputs
        ]
        response = CompletionResponse(
            id=job.request_id, created=job.created, model=serving.model_name, choices=choices, usage=job.usage()
        )
        return JSONResponse(response.model_dump())

    async def _events(self, job: Job, req: CompletionRequest) -> AsyncGenerator[str, None]:
        model = self.serving.model_name
        exclude = None if req.include_usage else {"usage"}
        offsets: dict[int, int] = {}
        started: set[int] = set()
        async for index, c, text, logprobs in deltas(job):
            if req.echo and index not in started:
                text = job.prompt_texts[index // job.params.n] + text
            started.add(index)
            choice = CompletionChoice(index=index, text=text, finish_reason=c.finish_reason)
            if req.logprobs is not None:
                choice.logprobs = self._logprobs(logprobs, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in choice.logprobs.tokens)
            chunk = CompletionResponse(id=job.request_id, created=job.created, model=model, choices=[choice])
            yield sse(chunk, exclude)
        if req.include_usage:
            yield sse(
                CompletionResponse(id=job.request_id, created=job.created, model=model, choices=[], usage=job.usage())
            )
        yield SSE_DONE

    def _logprobs(self, logprobs: list[TokenLogprob], start_offset: int) -> CompletionLogprobs:
        """The legacy format: tokens, their logprobs, the top alternatives and each token's character offset."""
        token_text = self.serving.token_text
        result = CompletionLogprobs()
        offset = start_offset
        for lp in logprobs:
            token = token_text(lp.token_id)
            result.tokens.append(token)
            result.token_logprobs.append(finite(lp.logprob))
            result.top_logprobs.append({token_text(t): finite(v) for t, v in lp.top.items()})
            result.text_offset.append(offset)
            offset += len(token)
        return result
