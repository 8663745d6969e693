"""Attention straight on contiguous KV rows: no gather, no padding, stock SDPA.

With the virtual KV cache a request's keys are one run of flat cache slots,
`[kv_start, kv_start + kv_len)`, so `k_cache[kv_start : kv_start + kv_len]` is
a view (strided through the other layers in the megacache layout) that torch's
scaled_dot_product_attention reads in place. The paged path must first gather
every request's blocks into a padded copy; this path copies nothing, at the
price of one SDPA call per request.

Grouped-query attention goes to SDPA as is (`enable_gqa`: on CPU it measured
faster than folding each group of query heads into the query length). A fresh
prompt uses the causal flag (the fast kernel), a later chunk an explicit mask
over its cached prefix, and a decode no mask at all.

    q rows of one request (n, H, D) -> (1, H, n, D)
    k_cache[kv_start : kv_start + kv_len] (kv_len, KV, D) -> (1, KV, kv_len, D), a view
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KVSpan:
    """One request in the step: its query rows and where its KV run starts."""

    token_start: int  # first row of the request's tokens in the flat batch
    num_tokens: int  # tokens computed this step (1 when decoding)
    kv_start: int  # flat cache slot of the request's position 0
    num_computed: int  # positions already in the cache before this step

    @property
    def kv_len(self) -> int:
        return self.num_computed + self.num_tokens


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    spans: list[KVSpan],
    scale: float,
) -> torch.Tensor:
    """q: (T, H, D); k, v: (T, KV, D); caches: (num_slots, KV, D) flat views. Returns (T, H, D)."""
    write_kv(k_cache, v_cache, slot_mapping, k, v)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    for span in spans:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        run = slice(span.kv_start, span.kv_start + span.kv_len)
        q_s = q[rows].transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
        keys = k_cache[run].transpose(0, 1).unsqueeze(0)  # (1, KV, L, D), strided view
        values = v_cache[run].transpose(0, 1).unsqueeze(0)
        mask = None
        if span.num_tokens > 1 and span.num_computed > 0:
            # Query i sits at position num_computed + i and sees keys up to it.
            q_pos = torch.arange(span.num_tokens, device=q.device) + span.num_computed
            mask = torch.arange(span.kv_len, device=q.device)[None, :] <= q_pos[:, None]
        causal = span.num_tokens > 1 and span.num_computed == 0
        o = F.scaled_dot_product_attention(
            q_s, keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store the step's new keys and values at their slots, in the cache's dtype.

    Quantized projections hand back bfloat16 values; the cache keeps the model's dtype.
    """
    k_cache[slot_mapping] = k.to(k_cache.dtype)
    v_cache[slot_mapping] = v.to(v_cache.dtype)
