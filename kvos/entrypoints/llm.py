"""The offline API: hand in prompts, get completions back in the same order."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, cast

from tqdm.auto import tqdm

from kvos.config import EngineConfig
from kvos.engine.llm_engine import LLMEngine
from kvos.outputs import RequestOutput
from kvos.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


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
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        one = bool(messages) and isinstance(messages[0], dict)
        conversations = [cast(list[Message], messages)] if one else list(cast(Sequence[list[Message]], messages))
        prompts = [self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True) for c in conversations]
        token_prompts = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_prompts, params, use_tqdm)

    def _run(self, req_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(req_ids)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(req_ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.req_id in pending:
                        pending.discard(out.req_id)
                        finished[out.req_id] = out
                        bar.update(1)
        return [finished[r] for r in req_ids]
