"""Attention straight on contiguous KV rows: no gather, no padding, stock SDPA.

With the virtual KV cache a request's keys are one run of flat cache slots,
`[kv_start, kv_start + kv_len)`, so `k_cache[kv_start : kv_start + kv_len]` is
a view (strided through the other layers in the megacache layout) that torch's
scaled_dot_product_attention reads in place. The paged path must first gather
every request's blocks into a padded copy; this path copies nothing, at the
price of one SDPA call per request.

Grouped-query attention is folded into the query length rather than expanding
K/V: the G query heads that share a KV head become G x n query rows of that
head, so K and V are read once, as they lie.

    q (n, H=KV*G, D) -> (1, KV, G*n, D)    k view (kv_len, KV, D) -> (1, KV, kv_len, D)
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
    k_cache[slot_mapping] = k
    v_cache[slot_mapping] = v
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for span in spans:
        n = span.num_tokens
        keys = k_cache[span.kv_start : span.kv_start + span.kv_len].permute(1, 0, 2).unsqueeze(0)  # (1, KV, L, D)
        values = v_cache[span.kv_start : span.kv_start + span.kv_len].permute(1, 0, 2).unsqueeze(0)
        rows = slice(span.token_start, span.token_start + n)
        # (n, KV*G, D) -> (1, KV, G*n, D): query row g*n + i is head (kv, g) at position i.
        q_s = q[rows].view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * n, head_dim)
        mask = None
        if n > 1:
            q_pos = torch.arange(n, device=q.device) + span.num_computed
            k_pos = torch.arange(span.kv_len, device=q.device)
            mask = (k_pos[None, :] <= q_pos[:, None]).repeat(group, 1)  # (G*n, L)
        o = F.scaled_dot_product_attention(q_s, keys, values, attn_mask=mask, scale=scale)  # (1, KV, G*n, D)
        out[rows] = o.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
    return out
