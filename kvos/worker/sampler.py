"""Turn logits into tokens: logit bias, penalties, grammar masks, temperature, top-k/top-p/min-p, seeds.

Greedy rows are an argmax over the whole batch at once; sampled rows go one
by one, because each may carry its own seeded generator and its own filters.
A row that fails (whatever the cause) yields its exception in its place and
never costs the other rows their tokens: one request's bad luck or bad
input ends that request only.

A row with a grammar (structured output) has every token its grammar refuses
masked to -inf after bias and penalties, so greedy and sampled rows alike pick
an allowed token; the grammar then consumes that token here, inside the row's
own failure boundary.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kvos.core.plan import SampledToken
from kvos.extensions import build_cpu_extension
from kvos.outputs import TokenLogprob
from kvos.sampling_params import SamplingParams
from kvos.structured.grammar import GrammarError, GrammarMatcher

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "sampler_ops.cpp"


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one request."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    grammar: GrammarMatcher | None = None
    """Advanced by `sample` with the token it picks for this row."""


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken | Exception]:
    """logits: (R, V) float32, one row per entry of `rows`; a failed row holds its exception."""
    results: list[SampledToken | Exception | None] = [None] * len(rows)
    want_logprobs = any(r.params.logprobs is not None for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    adjusted = [i for i, r in enumerate(rows) if _adjusts_logits(r.params) or r.grammar is not None]
    if adjusted:
        logits = logits.clone()
        for i in adjusted:
            try:
                _adjust_row(logits[i], rows[i])
            except Exception as exc:  # this row fails alone
                results[i] = exc
    greedy_ids = greedy(logits).tolist()
    for i, row in enumerate(rows):
        if results[i] is not None:
            continue
        try:
            token_id = greedy_ids[i] if row.params.greedy else _sample_row(logits[i], row.params, row.generator)
            if row.grammar is not None:
                row.grammar.advance([token_id])
            logprob = None
            if raw_logprobs is not None and row.params.logprobs is not None:
                logprob = _token_logprob(raw_logprobs[i], token_id, row.params.logprobs)
            results[i] = SampledToken(token_id, logprob)
        except Exception as exc:  # this row fails alone
            results[i] = exc
    return [r for r in results if r is not None]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax: the first maximum, a NaN counting as the largest. (R, V) float32 -> (R,) int64.

    On a CPU by kvos's kernel (`csrc/sampler_ops.cpp`: torch's reduction took about 3 ms of a
    64-row decode step, the kernel a fraction of it); elsewhere, or without a compiler, by torch.
    """
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and _load_kernel():
        return torch.ops.kvos.argmax_rows(logits if logits.stride(-1) == 1 else logits.contiguous())
    return logits.argmax(dim=-1)


@functools.cache
def _load_kernel() -> bool:
    try:
        build_cpu_extension("kvos_sampler_ops", _SOURCE, "the greedy sampler")
    except ValueError as exc:
        logger.warning("greedy sampling uses torch's argmax: %s", exc)
        return False
    return True


def _adjusts_logits(p: SamplingParams) -> bool:
    return bool(p.logit_bias) or p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)


def _adjust_row(row: torch.Tensor, r: SamplingRow) -> None:
    """Logit bias, then penalties, then the grammar's mask, in place on one row of logits (V,)."""
    p = r.params
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
        row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
    if p.repetition_penalty != 1.0:
        # As in HF: the whole context counts; positive logits shrink, negative grow.
        seen = torch.tensor(sorted(set(r.prompt_token_ids + r.output_token_ids)), dtype=torch.long, device=row.device)
        if len(seen):
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
        # As in OpenAI: only generated tokens count.
        ids, counts = torch.tensor(r.output_token_ids, dtype=torch.long, device=row.device).unique(return_counts=True)
        row[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(row.dtype)
    if r.grammar is not None:
        allowed = r.grammar.allowed().to(row.device)
        if not bool(allowed.any()):
            raise GrammarError("the grammar allows no token")
        row.masked_fill_(~allowed, float("-inf"))


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(filtered_probs(logits, p), 1, generator=generator).item())


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from: temperature, then top-k, top-p, min-p.

    The order and the rules are Hugging Face's (its logits warpers), so the two
    sample from the same distribution; each filter sees the renormalised
    survivors of the one before.
    """
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p, and always the top token: a top_p below
        # float32's smallest number (a valid request: it only has to be > 0) rounds to 0 in the comparison,
        # which would drop every token and leave 0 / 0.
        drop = cumulative - sorted_probs >= p.top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


def _token_logprob(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    top: dict[int, float] = {}
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        top = dict(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=top)
