"""Sampling, n > 1, stop conditions, aborts and input errors on the default model."""

from __future__ import annotations

import pytest

from kvos import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_bytes=64 * 2**20, dtype="float32")


@pytest.fixture(autouse=True)
def no_leak(llm: LLM):
    yield
    assert llm.engine.kv_manager.num_used_blocks == 0
    assert not llm.engine.has_unfinished_requests()


PROMPT = "Once upon a time, there was a little robot who wanted to paint. Every morning, it"


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16)
    a = llm.generate([PROMPT, PROMPT], params, use_tqdm=False)
    b = llm.generate([PROMPT], params, use_tqdm=False)
    assert a[0].outputs[0].token_ids == a[1].outputs[0].token_ids == b[0].outputs[0].token_ids
    other = llm.generate([PROMPT], SamplingParams(temperature=0.9, seed=99, max_tokens=16), use_tqdm=False)
    assert other[0].outputs[0].token_ids != a[0].outputs[0].token_ids


def test_n_gives_n_distinct_sequences_sharing_prompt_blocks(llm: LLM) -> None:
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12)
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 12 or c.finish_reason == "stop" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_n_greedy_forks_give_identical_copies_equal_to_n1(llm: LLM) -> None:
    (single,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    (multi,) = llm.generate([PROMPT], SamplingParams(n=3, temperature=0, max_tokens=10), use_tqdm=False)
    for c in multi.outputs:
        assert c.token_ids == single.outputs[0].token_ids


def test_stop_string_cuts_exactly_and_is_not_emitted(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    (free,) = llm.generate([PROMPT], greedy, use_tqdm=False)
    text = free.outputs[0].text
    # Stop on a string that starts mid-way through the text, spanning a token boundary.
    stop = text[11:16]
    assert len(stop) == 5
    (cut,) = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]), use_tqdm=False
    )
    assert cut.outputs[0].text == text[: text.index(stop)]
    assert cut.outputs[0].finish_reason == "stop"
    assert cut.outputs[0].stop_reason == stop


def test_max_tokens_finishes_with_length_and_eos_with_stop(llm: LLM) -> None:
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 5
    (chat,) = llm.chat(
        [{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200), use_tqdm=False
    )
    assert chat.outputs[0].finish_reason == "stop"
    assert chat.outputs[0].token_ids[-1] in llm.engine.eos_token_ids


def test_logprobs_report_chosen_token_and_top_k(llm: LLM) -> None:
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False)
    lps = out.outputs[0].logprobs
    assert lps is not None and len(lps) == 4
    for token_id, lp in zip(out.outputs[0].token_ids, lps):
        assert lp.token_id == token_id
        assert len(lp.top) == 3
        # Greedy: the chosen token is the most likely one.
        assert max(lp.top.values()) == pytest.approx(lp.logprob)


def test_abort_frees_everything_mid_generation(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("to-abort", PROMPT, SamplingParams(max_tokens=100, n=2, temperature=1.0))
    for _ in range(3):
        engine.step()
    assert engine.kv_manager.num_used_blocks > 0
    engine.abort_request("to-abort")
    assert engine.kv_manager.num_used_blocks == 0
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"n": 0}, "n"),
        ({"min_p": 2.0}, "min_p"),
        ({"logprobs": 50}, "logprobs"),
        ({"presence_penalty": 5.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"seed": -3}, "seed"),
        ({"max_tokens": "ten"}, "max_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_are_refused_with_clear_errors(llm: LLM) -> None:
    engine = llm.engine
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("e1", "", SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("e2", [1, 2, 10**7], SamplingParams())
    with pytest.raises(ValueError, match="context length of 8192"):
        engine.add_request("e3", [1] * 8000, SamplingParams(max_tokens=500))
    with pytest.raises(ValueError, match="must be a string or a list of token ids"):
        engine.add_request("e4", 42, SamplingParams())  # type: ignore[arg-type]
    engine.add_request("dup", "hello", SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", "hello", SamplingParams(max_tokens=1))
    engine.abort_request("dup")


def test_request_larger_than_kv_capacity_is_refused() -> None:
    small = LLM(kv_cache_memory_bytes=2 * 30 * 3 * 64 * 4 * 64, dtype="float32")  # 64 tokens of KV
    with pytest.raises(ValueError, match=r"needs 110 tokens.*at most 64"):
        small.engine.add_request("big", [1] * 100, SamplingParams(max_tokens=10))
    assert small.engine.kv_manager.num_used_blocks == 0


def test_unknown_engine_option_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown engine option.*kv_cahce"):
        LLM(kv_cahce="paged", dtype="float32")
