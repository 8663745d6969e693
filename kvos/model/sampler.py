"""Turn logits into tokens: penalties, temperature, top-k/top-p/min-p, seeds.

Greedy rows are an argmax over the whole batch at once; sampled rows go one
by one, because each may carry its own seeded generator and its own filters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvos.outputs import TokenLogprob
from kvos.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one request."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
    """logits: (R, V) float32, one row per entry of `rows`."""
    want_logprobs = any(r.params.logprobs is not None for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    logits = _apply_penalties(logits, rows)
    token_ids = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if not row.params.greedy:
            token_ids[i] = _sample_row(logits[i], row.params, row.generator)
    results = []
    for i, (row, token_id) in enumerate(zip(rows, token_ids)):
        logprob = None
        if raw_logprobs is not None and row.params.logprobs is not None:
            logprob = _token_logprob(raw_logprobs[i], token_id, row.params.logprobs)
        results.append(SampledToken(token_id, logprob))
    return results


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    penalised = [
        i
        for i, r in enumerate(rows)
        if r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty
    ]
    if not penalised:
        return logits
    logits = logits.clone()
    for i in penalised:
        p = rows[i].params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            # As in HF: the whole context counts; positive logits shrink, negative grow.
            seen = torch.tensor(sorted(set(rows[i].prompt_token_ids + rows[i].output_token_ids)), dtype=torch.long)
            if len(seen):
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and rows[i].output_token_ids:
            # As in OpenAI: only generated tokens count.
            ids, counts = torch.tensor(rows[i].output_token_ids, dtype=torch.long).unique(return_counts=True)
            row[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(row.dtype)
    return logits


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always the top token).
        drop = cumulative - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _token_logprob(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    top: dict[int, float] = {}
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        top = dict(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=top)
