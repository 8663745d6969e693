"""The sampler against Hugging Face's logits processors and OpenAI's penalty formula, on the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvos.core.plan import SampledToken
from kvos.sampling_params import SamplingParams
from kvos.worker import sampler
from kvos.worker.sampler import SamplingRow, filtered_probs, sample

VOCAB = 50


def hf_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """HF's warpers in its generation order: temperature, top-k, top-p, min-p."""
    scores = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return torch.softmax(scores, dim=-1)[0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=7),
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02),
    ],
)
def test_filters_match_hf_warpers(params: SamplingParams) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(VOCAB, generator=generator) * 3
        ours, theirs = filtered_probs(logits, params), hf_probs(logits, params)
        assert torch.equal(ours > 0, theirs > 0)  # the same tokens survive
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("top_p", [5e-324, 1e-46, 1e-40, 1e-5])
def test_a_top_p_too_small_for_float32_keeps_the_top_token(top_p: float) -> None:
    """Found by the server's fuzz test: 5e-324 is a valid top_p but rounds to 0 against float32 sums, which
    dropped every token (NaN probabilities, the request failed). Any tiny top_p keeps the argmax alone."""
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    probs = filtered_probs(logits, SamplingParams(top_p=top_p))
    expected = torch.zeros(VOCAB)
    expected[int(logits.argmax())] = 1.0
    assert torch.equal(probs, expected)


def test_repetition_penalty_matches_hf() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    prompt, output = [1, 2, 3, 3], [4, 9]
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    ours = logits.clone()
    sampler._adjust_row(ours, SamplingRow(params, prompt, output, None))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits[None].clone())[0]
    torch.testing.assert_close(ours, theirs)


def test_presence_and_frequency_penalties_follow_openais_formula() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2))
    output = [4, 4, 4, 7]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    ours = logits.clone()
    sampler._adjust_row(ours, SamplingRow(params, [4, 9], output, None))
    # mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence, over generated tokens only.
    expected = logits.clone()
    for token in set(output):
        count = output.count(token)
        expected[token] -= count * 0.25 + 0.5
    torch.testing.assert_close(ours, expected)


def test_logit_bias_is_added_before_choosing() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 5.0
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logit_bias={17: 10.0}), [1], [], None),
        SamplingRow(SamplingParams(temperature=0.0, logit_bias={3: -100.0}), [1], [], None),
    ]
    tokens = sample(logits, rows)
    assert isinstance(tokens[0], SampledToken) and tokens[0].token_id == 17
    assert isinstance(tokens[1], SampledToken) and tokens[1].token_id != 3


def test_a_tiny_temperature_is_greedy_not_nan() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3)) * 50
    rows = [SamplingRow(SamplingParams(temperature=t), [1], [], None) for t in (1e-40, 1e-9, 5e-324)]
    tokens = sample(logits, rows)
    assert [t.token_id for t in tokens if isinstance(t, SampledToken)] == logits.argmax(-1).tolist()


def test_greedy_takes_the_first_of_tied_maxima() -> None:
    """Ties happen (bfloat16 logits, logit_bias): the lowest token id wins, as in HF's greedy search."""
    logits = torch.zeros(3, VOCAB)
    logits[0, [7, 3, 40]] = 5.0
    logits[1, -1] = 1.0
    logits[2] = -1.0
    rows = [SamplingRow(SamplingParams(temperature=0.0), [1], [], None) for _ in range(3)]
    assert [t.token_id for t in sample(logits, rows) if isinstance(t, SampledToken)] == [3, VOCAB - 1, 0]


def test_greedy_is_the_first_maximum_with_nan_counting_as_the_largest() -> None:
    logits = torch.randn(70, 3000, generator=torch.Generator().manual_seed(5))
    logits[1, [2999, 0]] = 50.0  # a tie at both ends
    logits[2] = float("-inf")
    logits[3, [700, 9]] = float("nan")
    logits[4, 1234] = float("inf")
    logits[5, :] = 0.0
    want = []
    for row in logits.tolist():
        nans = [i for i, x in enumerate(row) if x != x]
        want.append(nans[0] if nans else max(range(len(row)), key=lambda i: (row[i], -i)))
    assert sampler.greedy(logits).tolist() == want
    assert want[:6] == [want[0], 0, 0, 9, 1234, 0]
    # A row view with a stride (the rows of a larger batch) and a single row.
    assert sampler.greedy(logits[::3]).tolist() == want[::3]
    assert sampler.greedy(logits[4:5]).tolist() == [1234]
    assert sampler.greedy(logits.t().contiguous().t()).tolist() == want  # columns not contiguous


def test_one_failing_row_leaves_the_others_their_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sampler._sample_row

    def fragile(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
        if p.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, p, generator)

    monkeypatch.setattr(sampler, "_sample_row", fragile)
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(4))
    rows = [
        SamplingRow(SamplingParams(temperature=0.0), [1], [], None),
        SamplingRow(SamplingParams(temperature=1.0, seed=666), [1], [], None),
        SamplingRow(SamplingParams(temperature=1.0, seed=1), [1], [], torch.Generator().manual_seed(1)),
    ]
    greedy, failed, seeded = sample(logits, rows)
    assert isinstance(greedy, SampledToken) and greedy.token_id == int(logits[0].argmax())
    assert isinstance(failed, RuntimeError)
    assert isinstance(seeded, SampledToken)
