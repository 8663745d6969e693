"""Contiguous-row attention gives what the gather path gives, on the same virtual cache."""

from __future__ import annotations

import pytest
import torch

from kvos.attention import contiguous, torch_sdpa
from kvos.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from kvos.engine.request import Request
from kvos.memory.factory import KVShape
from kvos.memory.virtual import VirtualKVCacheManager
from kvos.memory.virtual.layout import LayoutKind
from kvos.sampling_params import SamplingParams

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 6, 2, 16


@pytest.mark.parametrize("layout", ["megacache", "per_layer"])
def test_contiguous_attention_matches_gather_attention(layout: LayoutKind) -> None:
    torch.manual_seed(0)
    shape = KVShape(3, NUM_KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))
    kv = VirtualKVCacheManager(
        budget_bytes=2**20, shape=shape, max_num_seqs=4, max_model_len=64, layout=layout, lookahead_tokens=0
    )
    # (tokens already cached, tokens computed this step): a fresh prefill, a later
    # prompt chunk, and two decodes of different lengths.
    plan = [(0, 7), (4, 5), (9, 1), (3, 1)]
    requests = []
    for i, (done, new) in enumerate(plan):
        request = Request(f"r{i}", list(range(done + new)), SamplingParams(max_tokens=1))
        assert kv.allocate_slots(request, done + new)
        requests.append(request)
    layer = 1
    k_cache, v_cache = kv.kv_caches[layer]
    for request, (done, _) in zip(requests, plan):
        idx = kv.kv_indices(request, done)
        k_cache[idx] = torch.randn(done, NUM_KV_HEADS, HEAD_DIM)
        v_cache[idx] = torch.randn(done, NUM_KV_HEADS, HEAD_DIM)

    num_tokens = sum(new for _, new in plan)
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    slots, spans, prefills, decode_rows, decode_idx = [], [], [], [], []
    row = 0
    for request, (done, new) in zip(requests, plan):
        idx = kv.kv_indices(request, done + new)
        slots.append(idx[done:])
        spans.append(contiguous.KVSpan(row, new, kv.kv_start(request), done))
        if new == 1:
            decode_rows.append(row)
            decode_idx.append(idx)
        else:
            prefills.append(PrefillChunk(row, new, done, idx))
        row += new
    max_len = max(len(i) for i in decode_idx)
    padded = torch.stack([torch.cat([i, i[:1].repeat(max_len - len(i))]) for i in decode_idx])
    lengths = torch.tensor([len(i) for i in decode_idx])
    mask = (torch.arange(max_len)[None, :] < lengths[:, None])[:, None, None, :]
    meta = AttentionMetadata(torch.cat(slots), DecodeBatch(torch.tensor(decode_rows), padded, mask, all_rows=len(decode_rows) == num_tokens), prefills)

    scale = HEAD_DIM**-0.5
    expected = torch_sdpa.attention(q, k, v, k_cache, v_cache, meta, scale)
    got = contiguous.attention(q, k, v, k_cache, v_cache, meta.slot_mapping, spans, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    kv.close()
