"""Attention over the KV cache with torch's scaled_dot_product_attention.

Works with any manager that maps token positions to flat cache slots (paged
block tables and virtual contiguous rows alike): K/V are written through
`slot_mapping` and read back by gathering `kv_indices`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvos.attention import contiguous
from kvos.attention.metadata import AttentionMetadata, DecodeBatch


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: (T, H, D); k, v: (T, KV, D); caches: (num_slots, KV, D). Returns (T, H, D)."""
    if meta.spans is not None:
        return contiguous.attention(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.spans, scale)
    contiguous.write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
    if meta.decode is not None and meta.decode.all_rows:
        # A pure decode step: the batch is the flat token list, nothing to gather or scatter.
        return _decode(q, k_cache, v_cache, meta.decode, scale)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    if meta.decode is not None:
        d = meta.decode
        out[d.token_rows] = _decode(q[d.token_rows], k_cache, v_cache, d, scale)
    for p in meta.prefills:
        rows = slice(p.token_start, p.token_start + p.num_tokens)
        q_p = q[rows].transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
        k_p = _gather(k_cache, p.kv_indices).transpose(0, 1).unsqueeze(0)  # (1, KV, L, D)
        v_p = _gather(v_cache, p.kv_indices).transpose(0, 1).unsqueeze(0)
        if p.num_computed == 0:
            o = F.scaled_dot_product_attention(q_p, k_p, v_p, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # Query i sits at position num_computed + i and sees keys up to it.
            q_pos = torch.arange(p.num_tokens, device=q.device) + p.num_computed
            k_pos = torch.arange(p.num_computed + p.num_tokens, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def _gather(cache: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """cache[indices] for flat slot indices of any shape, plus the cache's trailing dims.

    `index_select` copies whole rows; advanced indexing is several times slower on CPU.
    """
    return cache.index_select(0, indices.reshape(-1)).view(*indices.shape, *cache.shape[1:])


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: DecodeBatch, scale: float) -> torch.Tensor:
    """q: (B, H, D), one query per request -> (B, H, D) over each request's gathered context.

    The query heads sharing a KV head ride as that head's query rows,
    (B, KV, H / KV, D): plain attention over the un-repeated keys, faster on
    CPU than SDPA's grouped-query mode.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    k_b = _gather(k_cache, d.kv_indices).transpose(1, 2)  # (B, KV, L, D)
    v_b = _gather(v_cache, d.kv_indices).transpose(1, 2)
    q_b = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=d.mask, scale=scale)
    return o.reshape(batch, num_heads, head_dim)
