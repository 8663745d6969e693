"""The engine core in its own process: the same tokens as HF, the same errors, nothing left behind."""

from __future__ import annotations

import pytest

from kvos import LLM, SamplingParams
from kvos.core.core_process import EngineCoreProcess
from kvos.errors import InvalidRequestError
from tests.conftest import GreedyFn

TEXTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def llm() -> LLM:
    with LLM(core_process=True, kv_cache_memory_bytes=64 * 2**20, dtype="float32") as llm:
        yield llm


def test_greedy_tokens_match_hf(llm: LLM, hf_smollm: GreedyFn) -> None:
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_smollm(prompts, MAX_NEW)
    assert llm.engine.stats().num_used_blocks == 0


def test_n_siblings_and_stop_strings_cross_the_process(llm: LLM) -> None:
    (out,) = llm.generate(
        ["Count: one, two,"], SamplingParams(n=2, temperature=0.0, max_tokens=12, stop=[","]), use_tqdm=False
    )
    assert [c.finish_reason for c in out.outputs] == ["stop", "stop"]
    assert all("," not in c.text for c in out.outputs)
    assert not llm.engine.has_unfinished_requests()


def test_bad_input_is_refused_in_the_front_end(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as refused:
        llm.engine.add_request("bad", [1, 10**9], SamplingParams())
    assert refused.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="at most"):
        llm.engine.add_request("long", [1], SamplingParams(max_tokens=4000))


def test_close_stops_the_process() -> None:
    llm = LLM(core_process=True, kv_cache_memory_bytes=16 * 2**20, dtype="float32")
    core = llm.engine.core
    assert isinstance(core, EngineCoreProcess)
    process = core._process
    assert process.is_alive()
    llm.close()
    assert not process.is_alive()
    llm.close()
