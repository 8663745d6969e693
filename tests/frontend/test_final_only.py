"""`LLMEngine.step(final_only=True)`, as the offline `LLM` steps: only requests that ended, each whole."""

from __future__ import annotations

from kvos.config import EngineConfig
from kvos.engine.llm_engine import LLMEngine
from kvos.sampling_params import SamplingParams


def test_final_only_steps_return_each_request_once_when_it_ends() -> None:
    engine = LLMEngine(EngineConfig.from_kwargs(kv_cache_memory_bytes=2**26))
    lengths = {"short": 2, "long": 7}
    for req_id, n in lengths.items():
        engine.add_request(req_id, "The capital of France is", SamplingParams(max_tokens=n, ignore_eos=True))
    seen = []
    steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step(final_only=True)
        steps += 1
        assert all(out.finished for out in outputs)
        seen += outputs
    assert steps >= 7  # the long request decoded on, and its steps returned nothing
    assert sorted(out.req_id for out in seen) == ["long", "short"]
    for out in seen:
        completion = out.outputs[0]
        assert len(completion.token_ids) == lengths[out.req_id]
        assert completion.text == engine.tokenizer.decode(completion.token_ids)
        assert completion.finish_reason == "length"
