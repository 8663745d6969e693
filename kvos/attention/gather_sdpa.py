"""The reference backend: gather each request's KV out of the cache, then torch SDPA.

Works over any KV layout that maps positions to flat slots (paged block
tables and virtual rows alike): K/V are written through `slot_mapping` and
read back by gathering each request's context slots. Decodes are gathered into
one padded batch and attended together; each prefill chunk on its own.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kvos.attention.backend import SeqLayout, slot_mapping
from kvos.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk


class GatherSDPABackend:
    name: ClassVar[str] = "gather_sdpa"
    needs_contiguous_kv: ClassVar[bool] = False

    def build_metadata(self, seqs: list[SeqLayout], num_tokens: int, device: torch.device) -> AttentionMetadata:
        decodes = [s for s in seqs if s.num_tokens == 1]
        prefills = [prefill_chunk(s, device) for s in seqs if s.num_tokens > 1]
        return AttentionMetadata(
            slot_mapping=slot_mapping(seqs),
            decode=decode_batch(decodes, num_tokens, device),
            prefills=prefills,
        )

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
        """q: (T, H, D); k, v: (T, KV, D); caches: (num_slots, KV, D). Returns (T, H, D)."""
        write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
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
            k_p = gather_slots(k_cache, p.kv_indices).transpose(0, 1).unsqueeze(0)  # (1, KV, L, D)
            v_p = gather_slots(v_cache, p.kv_indices).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                q_p, k_p, v_p, attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=gqa
            )
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out


def prefill_chunk(seq: SeqLayout, device: torch.device) -> PrefillChunk:
    """A request's prompt tokens of the step, with its context's slots and, over a cached prefix,
    the mask that lets query i (at position num_computed + i) see keys up to its own position."""
    mask = None
    if seq.num_computed > 0:
        q_pos = torch.arange(seq.num_tokens, device=device) + seq.num_computed
        k_pos = torch.arange(seq.num_computed + seq.num_tokens, device=device)
        mask = k_pos[None, :] <= q_pos[:, None]
    return PrefillChunk(seq.token_start, seq.num_tokens, seq.num_computed, seq.context_slots.to(device), mask)


def decode_batch(decodes: list[SeqLayout], num_tokens: int, device: torch.device) -> DecodeBatch | None:
    """The one-token requests as a padded batch of their context slots."""
    if not decodes:
        return None
    lengths = [s.num_computed + 1 for s in decodes]
    max_len = max(lengths)
    # Padding repeats the request's own first slot, which is always backed by
    # memory (slot 0 may sit on an unmapped page of a virtual cache); the mask hides it.
    padded = torch.empty(len(decodes), max_len, dtype=torch.long, device=device)
    for b, (s, n) in enumerate(zip(decodes, lengths)):
        padded[b, :n] = s.context_slots
        padded[b, n:] = s.context_slots[0]
    mask = torch.arange(max_len, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return DecodeBatch(
        token_rows=torch.tensor([s.token_start for s in decodes], dtype=torch.long, device=device),
        kv_indices=padded,
        mask=mask[:, None, None, :],
        all_rows=len(decodes) == num_tokens,
    )


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store the step's new keys and values at their slots, in the cache's dtype.

    Quantized projections hand back bfloat16 values; the cache keeps the model's dtype.
    """
    k_cache[slot_mapping] = k.to(k_cache.dtype)
    v_cache[slot_mapping] = v.to(v_cache.dtype)


def gather_slots(cache: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """cache[indices] for flat slot indices of any shape, plus the cache's trailing dims.

    `index_select` copies whole rows; advanced indexing is several times slower on CPU.
    """
    return cache.index_select(0, indices.reshape(-1)).view(*indices.shape, *cache.shape[1:])


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: DecodeBatch, scale: float
) -> torch.Tensor:
    """q: (B, H, D), one query per request -> (B, H, D) over each request's gathered context.

    The query heads sharing a KV head ride as that head's query rows,
    (B, KV, H / KV, D): plain attention over the un-repeated keys, faster on
    CPU than SDPA's grouped-query mode.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    k_b = gather_slots(k_cache, d.kv_indices).transpose(1, 2)  # (B, KV, L, D)
    v_b = gather_slots(v_cache, d.kv_indices).transpose(1, 2)
    q_b = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=d.mask, scale=scale)
    return o.reshape(batch, num_heads, head_dim)
