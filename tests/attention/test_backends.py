"""Every attention backend against a naive softmax(QK^T / sqrt(d)) V written out by hand.

The KV sits in a real virtual cache (each request's run of slots inside the
megacache or per-layer layout), the cases mix a fresh prefill, a later
prompt chunk and decodes of different lengths, and the heads are grouped
(GQA), so masking, positions and head mapping are all checked.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvos.attention.backend import SeqLayout, make_backend
from kvos.core.request import Request
from kvos.memory.shape import KVShape
from kvos.memory.virtual import VirtualKVCacheManager
from kvos.memory.virtual.layout import LayoutKind
from kvos.sampling_params import SamplingParams
from kvos.worker.kv_cache import VirtualKVBuffer

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 6, 2, 16


def naive_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_computed: int) -> torch.Tensor:
    """q: (n, H, D) at positions num_computed.. ; keys, values: (L, KV, D) for positions 0..L-1 -> (n, H, D)."""
    group = q.shape[1] // keys.shape[1]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        visible = num_computed + i + 1
        for h in range(q.shape[1]):
            k = keys[:visible, h // group].double()
            v = values[:visible, h // group].double()
            scores = (k @ q[i, h].double()) / math.sqrt(q.shape[2])
            weights = torch.exp(scores - scores.max())
            out[i, h] = ((weights / weights.sum()) @ v).to(q.dtype)
    return out


@pytest.mark.parametrize("backend_name", ["gather_sdpa", "contiguous"])
@pytest.mark.parametrize("layout", ["megacache", "per_layer"])
def test_backend_matches_naive_attention(backend_name: str, layout: LayoutKind) -> None:
    torch.manual_seed(0)
    shape = KVShape(3, NUM_KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))
    kv = VirtualKVCacheManager(
        budget_bytes=2**20, shape=shape, max_num_seqs=4, max_model_len=64, layout=layout, lookahead_tokens=0
    )
    k_cache, v_cache = VirtualKVBuffer(kv.layout, kv.region).kv_caches[1]
    # (tokens already cached, tokens computed this step): a fresh prefill, a later
    # prompt chunk, and two decodes of different lengths.
    cases = [(0, 7), (4, 5), (9, 1), (3, 1)]
    seqs, cached = [], []
    row = 0
    for i, (done, new) in enumerate(cases):
        request = Request(f"r{i}", list(range(done + new)), SamplingParams(max_tokens=1))
        assert kv.allocate_slots(request, done + new)
        start = kv.block_table(request)[0] * kv.table_block_size
        slots = torch.arange(start, start + done + new)
        keys, values = torch.randn(done, NUM_KV_HEADS, HEAD_DIM), torch.randn(done, NUM_KV_HEADS, HEAD_DIM)
        k_cache[slots[:done]] = keys
        v_cache[slots[:done]] = values
        cached.append((keys, values))
        seqs.append(SeqLayout(row, new, done, slots))
        row += new
    q = torch.randn(row, NUM_HEADS, HEAD_DIM)
    k = torch.randn(row, NUM_KV_HEADS, HEAD_DIM)
    v = torch.randn(row, NUM_KV_HEADS, HEAD_DIM)

    backend = make_backend(backend_name)
    meta = backend.build_metadata(seqs, row, torch.device("cpu"))
    got = backend.forward(q, k, v, k_cache, v_cache, meta, HEAD_DIM**-0.5)

    for seq, (keys, values) in zip(seqs, cached):
        rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
        all_keys, all_values = torch.cat([keys, k[rows]]), torch.cat([values, v[rows]])
        expected = naive_attention(q[rows], all_keys, all_values, seq.num_computed)
        torch.testing.assert_close(got[rows], expected, rtol=1e-5, atol=1e-5)
        # The step's new keys and values were written where the request's next positions live.
        assert torch.equal(k_cache[seq.context_slots[seq.num_computed :]], k[rows])
    kv.close()


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*gather_sdpa"):
        make_backend("flash")
