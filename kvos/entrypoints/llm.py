"""The offline API: hand in prompts, get completions back in the same order."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any, cast

from tqdm.auto import tqdm

from kvos.config import EngineConfig
from kvos.engine.llm_engine import LLMEngine
from kvos.entrypoints.openai_protocol import ChatCompletionRequest, ProtocolError, parse_request
from kvos.errors import InvalidRequestError
from kvos.heap import frozen_heap
from kvos.outputs import RequestOutput
from kvos.sampling_params import SamplingParams
from kvos.structured.spec import StructuredOutput
from kvos.structured.tools import ToolPlan, parse_calls

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Batch generation over one engine: `LLM().generate(["Hello"], SamplingParams())`.

    `model=None` is the default SmolLM2-135M-Instruct; other keyword arguments
    are engine options (see `kvos.config`), e.g. `kv_cache="virtual"`.
    """

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Free the engine's KV memory (and its core process, if any). Safe to call twice."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string or token ids) together; outputs in input order.

        `priority` (one per prompt, lower is served sooner) needs `policy="priority"`.
        """
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)
        )
        prompts = [cast(Prompt, prompts)] if single else list(cast(Sequence[Prompt], prompts))
        if params is None:
            params = SamplingParams()
        param_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(param_list) != len(prompts):
            raise ValueError(f"got {len(param_list)} SamplingParams for {len(prompts)} prompts")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        req_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for req_id, prompt, p, prio in zip(req_ids, prompts, param_list, priorities):
                self.engine.add_request(req_id, prompt, p, prio)
            return self._run(req_ids, use_tqdm)
        finally:
            for req_id in req_ids:
                self.engine.abort_request(req_id)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate.

        Messages, `tools`, `tool_choice`, `parallel_tool_calls` and
        `response_format` are OpenAI's chat fields, read exactly as the server
        reads them (`kvos.structured`): with tools, each finished choice's
        calls are parsed into `CompletionOutput.tool_calls` (empty for a text
        answer); with `tool_choice` "required" or a named function, or a
        `response_format`, the output is constrained. Anything invalid is an
        InvalidRequestError (a ValueError) naming the field.
        """
        one = bool(messages) and isinstance(messages[0], dict)
        conversations = [cast(list[Message], messages)] if one else list(cast(Sequence[list[Message]], messages))
        fields: dict[str, Any] = {
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel_tool_calls,
            "response_format": response_format,
        }
        plans: list[ToolPlan | None] = []
        token_prompts = []
        structured: StructuredOutput | None = None
        for conversation in conversations:
            body = {"model": "", "messages": list(conversation), **{k: v for k, v in fields.items() if v is not None}}
            try:
                request = parse_request(ChatCompletionRequest, body)
                plan = request.tool_plan()
                structured = request.chat_structured()
                chat = request.conversation(plan)
            except ProtocolError as exc:
                raise InvalidRequestError(exc.message, exc.param) from exc
            plans.append(plan)
            text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
            token_prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        outputs = self.generate(token_prompts, _constrained(params, structured, len(conversations)), use_tqdm)
        for output, plan in zip(outputs, plans):
            if plan is None:
                continue
            for choice in output.outputs:
                if choice.finish_reason == "stop":
                    choice.tool_calls = parse_calls(choice.text, plan) or []
        return outputs

    def _run(self, req_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(req_ids)
        finished: dict[str, RequestOutput] = {}
        # Full collections would walk the engine's start-up heap (and the caller's) every few hundred steps.
        with frozen_heap(), tqdm(total=len(req_ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while pending:
                for out in self.engine.step(final_only=True):
                    if out.req_id in pending:
                        pending.discard(out.req_id)
                        finished[out.req_id] = out
                        bar.update(1)
        return [finished[r] for r in req_ids]


def _constrained(
    params: SamplingParams | Sequence[SamplingParams] | None, structured: StructuredOutput | None, count: int
) -> list[SamplingParams]:
    """One SamplingParams per conversation, each constrained to `structured` (the same for all of them)."""
    if params is None:
        params = SamplingParams()
    param_list = [params] * count if isinstance(params, SamplingParams) else list(params)
    if structured is None:
        return param_list
    if any(p.structured is not None for p in param_list):
        raise InvalidRequestError(
            "SamplingParams.structured cannot be combined with tools or response_format: give one constraint",
            "structured",
        )
    return [dataclasses.replace(p, structured=structured) for p in param_list]
