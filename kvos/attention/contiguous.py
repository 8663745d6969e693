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

from typing import ClassVar

import torch
import torch.nn.functional as F

from kvos.attention.backend import SeqLayout, slot_mapping
from kvos.attention.gather_sdpa import write_kv
from kvos.attention.metadata import AttentionMetadata, KVSpan


class ContiguousBackend:
    name: ClassVar[str] = "contiguous"
    needs_contiguous_kv: ClassVar[bool] = True

    def build_metadata(self, seqs: list[SeqLayout], num_tokens: int, device: torch.device) -> AttentionMetadata:
        spans = [KVSpan(s.token_start, s.num_tokens, s.kv_start, s.num_computed) for s in seqs]
        return AttentionMetadata(slot_mapping=slot_mapping(seqs), spans=spans)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: (T, H, D); k, v: (T, KV, D); caches: (num_slots, KV, D) flat views. Returns (T, H, D)."""
        if meta.spans is None:
            raise ValueError("the contiguous backend needs metadata built by its own build_metadata")
        return attention(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.spans, scale)


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
    """Write the step's K/V, then one SDPA call per request over its run of slots."""
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
