"""The Triton paged-attention kernel against a naive softmax(QK^T)V, and inside the engine against HF.

On a machine with a CUDA device (and TRITON_INTERPRET unset) the kernel is
compiled and run there; elsewhere it runs in Triton's interpreter on the
CPU, the same program. The cases are `test_backends`': scrambled block
tables over a paged pool, a fresh prompt, chunks over a cached prefix
(several query tiles, several key steps), decodes of many lengths, grouped
heads, float32 and bfloat16, and the virtual cache's one-entry tables.
"""

from __future__ import annotations

import pytest
import torch

from kvos import LLM
from kvos.attention import paged_triton
from kvos.attention.backend import SeqLayout, make_backend
from kvos.attention.gather_sdpa import write_kv
from kvos.config import ModelConfig
from tests.attention.test_backends import (
    NUM_HEADS,
    NUM_KV_HEADS,
    PAGED_CASES,
    _assert_matches_naive,
    _paged_step,
    naive_attention,
)
from tests.conftest import GreedyFn
from tests.engine.test_engine_equivalence import SHARED, TEXTS, check_against_hf

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available() and not paged_triton.interpreted()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _run(
    seqs: list[SeqLayout],
    qkv: tuple[torch.Tensor, ...],
    caches: tuple[torch.Tensor, ...],
    partition: int | None = None,
    block_n: int = paged_triton.BLOCK_N,
) -> torch.Tensor:
    """One layer's step on DEVICE; the output back on the CPU, after checking the step's K/V were written."""
    q, k, v = (x.to(DEVICE) for x in qkv)
    k_cache, v_cache = (c.to(DEVICE) for c in caches)
    on_device = [
        SeqLayout(
            s.token_start,
            s.num_tokens,
            s.num_computed,
            s.context_slots.to(DEVICE),
            None if s.block_table is None else s.block_table.to(DEVICE),
            s.block_size,
        )
        for s in seqs
    ]
    backend = make_backend("paged_triton")
    meta = backend.build_metadata(on_device, q.shape[0], DEVICE)
    if partition is None and block_n == paged_triton.BLOCK_N:
        out = backend.forward(q, k, v, k_cache, v_cache, meta, q.shape[2] ** -0.5)
    else:
        write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        out = paged_triton.paged_attention(q, k_cache, v_cache, meta, q.shape[2] ** -0.5, partition, block_n)
    for s in on_device:
        rows = slice(s.token_start, s.token_start + s.num_tokens)
        new_slots = s.context_slots[s.num_computed :]
        assert torch.equal(k_cache[new_slots], k[rows]) and torch.equal(v_cache[new_slots], v[rows])
    return out.cpu()


@pytest.mark.parametrize("block_size", [16, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_triton_kernel_matches_naive_attention(block_size: int, dtype: torch.dtype, head_dim: int) -> None:
    """Head size 80 is not a power of two: the kernel pads the dims it reads and masks them."""
    seqs, cached, k_cache, v_cache = _paged_step(block_size, dtype, PAGED_CASES, head_dim)
    num_tokens = sum(s.num_tokens for s in seqs)
    q = torch.randn(num_tokens, NUM_HEADS, head_dim).to(dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, head_dim).to(dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, head_dim).to(dtype)
    got = _run(seqs, (q, k, v), (k_cache, v_cache))
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    _assert_matches_naive(got, seqs, cached, (q, k, v), tolerance)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(9, 3), (32, 8), (8, 8)])
def test_triton_kernel_groups_heads_in_decode_only_and_mixed_steps(num_heads: int, num_kv_heads: int) -> None:
    """A decode-only step puts one token's group of heads in a tile; a mixed step 16 tokens' worth.
    SmolLM2's 3 heads per kv head, Llama-3-8B's 4 and plain multi-head attention."""
    for cases in ([(9, 1), (600, 1), (0, 1), (31, 1)], [(0, 20), (33, 1), (70, 18)]):
        seqs, cached, k_cache, v_cache = _paged_step(16, torch.float32, cases, 64, num_kv_heads)
        num_tokens = sum(s.num_tokens for s in seqs)
        q = torch.randn(num_tokens, num_heads, 64)
        k = torch.randn(num_tokens, num_kv_heads, 64)
        v = torch.randn(num_tokens, num_kv_heads, 64)
        got = _run(seqs, (q, k, v), (k_cache, v_cache))
        _assert_matches_naive(got, seqs, cached, (q, k, v), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("partition", "block_n"), [(32, 32), (64, 32), (512, 32), (64, 16), (128, 64), (None, 64)])
def test_split_contexts_merge_to_naive_attention(dtype: torch.dtype, partition: int | None, block_n: int) -> None:
    """Flash-decoding: each context cut into runs of `partition` positions, one program each, merged by a
    second launch. Short requests of the same launch get empty partitions (nothing visible), a chunk's
    rows see different numbers of partitions, and partition == block_n is one key step per partition.
    Key steps of 16 and 64 positions (the GPU check's alternatives to 32) with and without splitting."""
    cases = [(600, 1), (3, 1), (0, 20), (100, 40), (33, 1)]
    seqs, cached, k_cache, v_cache = _paged_step(16, dtype, cases, 64)
    num_tokens = sum(s.num_tokens for s in seqs)
    q = torch.randn(num_tokens, NUM_HEADS, 64).to(dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, 64).to(dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, 64).to(dtype)
    got = _run(seqs, (q, k, v), (k_cache, v_cache), partition, block_n)
    _assert_matches_naive(got, seqs, cached, (q, k, v), 1e-5 if dtype == torch.float32 else 2e-2)


def test_contexts_are_split_only_where_a_launch_would_leave_the_gpu_idle() -> None:
    cpu = torch.device("cpu")
    assert paged_triton.num_splits(8, 100_000, cpu) == 1  # the interpreter: never split unless asked
    seqs, _, k_cache, v_cache = _paged_step(16, torch.float32, [(3, 1)])
    meta = make_backend("paged_triton").build_metadata(seqs, 1, cpu)
    q = torch.randn(1, NUM_HEADS, 16)
    with pytest.raises(ValueError, match="partition must be a positive multiple of 32, got 40"):
        paged_triton.paged_attention(q, k_cache, v_cache, meta, 0.25, partition=40)
    with pytest.raises(ValueError, match="block_n must be a power of two of at least 16, got 48"):
        paged_triton.paged_attention(q, k_cache, v_cache, meta, 0.25, block_n=48)
    if ON_GPU:
        programs = torch.cuda.get_device_properties(DEVICE).multi_processor_count
        assert paged_triton.num_splits(8, 8192, DEVICE) == 8192 // paged_triton.PARTITION
        assert paged_triton.num_splits(8, paged_triton.PARTITION, DEVICE) == 1
        assert paged_triton.num_splits(2 * programs, 8192, DEVICE) == 1


def test_triton_kernel_reads_the_virtual_cache_through_one_entry_tables() -> None:
    """A virtual row is one table entry as long as the row: rows 2 and 0 of a 64-token layout."""
    row_tokens = 64
    k_cache = torch.randn(4 * row_tokens, NUM_KV_HEADS, 16)
    v_cache = torch.randn_like(k_cache)
    seqs = [
        SeqLayout(0, 1, 50, torch.arange(2 * row_tokens, 2 * row_tokens + 51), torch.tensor([2]), row_tokens),
        SeqLayout(1, 6, 20, torch.arange(0, 26), torch.tensor([0], dtype=torch.int32), row_tokens),
    ]
    cached = [(k_cache[s.context_slots[: s.num_computed]], v_cache[s.context_slots[: s.num_computed]]) for s in seqs]
    q = torch.randn(7, NUM_HEADS, 16)
    k, v = torch.randn(7, NUM_KV_HEADS, 16), torch.randn(7, NUM_KV_HEADS, 16)
    got = _run(seqs, (q, k, v), (k_cache, v_cache))
    _assert_matches_naive(got, seqs, cached, (q, k, v), 1e-5)


def test_a_table_entry_past_the_pool_reads_nothing_and_spares_its_neighbour() -> None:
    """A block id past the pool (a bug in the books) must not fault the GPU, which would end every request:
    its positions weigh nothing, and the other request of the step is untouched."""
    seqs, cached, k_cache, v_cache = _paged_step(16, torch.float32, [(20, 1), (40, 1)])
    bad = seqs[1]
    assert bad.block_table is not None
    table = bad.block_table.clone()
    table[1] = k_cache.shape[0] // 16 + 5  # positions 16-31 of the second request
    seqs[1] = SeqLayout(bad.token_start, 1, bad.num_computed, bad.context_slots, table, 16)
    q = torch.randn(2, NUM_HEADS, 16)
    k, v = torch.randn(2, NUM_KV_HEADS, 16), torch.randn(2, NUM_KV_HEADS, 16)
    both = _run(seqs, (q, k, v), (k_cache, v_cache))
    _assert_matches_naive(both[:1], seqs[:1], cached[:1], (q[:1], k[:1], v[:1]), 1e-5)
    keep = torch.cat([torch.arange(16), torch.arange(32, 40)])
    keys, values = cached[1]
    expected = naive_attention(q[1:], torch.cat([keys[keep], k[1:]]), torch.cat([values[keep], v[1:]]), 24)
    torch.testing.assert_close(both[1:], expected, rtol=1e-5, atol=1e-5)


def test_triton_backend_is_the_default_on_a_cuda_device() -> None:
    assert ModelConfig(device="cuda").resolved_attention_backend("paged") == "paged_triton"
    assert ModelConfig(device="cuda").resolved_attention_backend("virtual") == "paged_triton"
    assert ModelConfig(device="cpu").resolved_attention_backend("paged") == "paged"
    # Compiled decode steps are built on gather_sdpa's metadata on a GPU.
    assert ModelConfig(device="cuda", compile=True).resolved_attention_backend("paged") == "gather_sdpa"


def test_triton_backend_on_cpu_tensors_without_the_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="'paged_triton' runs on a CUDA device, not device='cpu'"):
        LLM(attention_backend="paged_triton")
    seqs, _, k_cache, v_cache = _paged_step(16, torch.float32, [(3, 1)])
    q, kv = torch.randn(1, NUM_HEADS, 16), torch.randn(1, NUM_KV_HEADS, 16)
    backend = make_backend("paged_triton")
    meta = backend.build_metadata(seqs, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="paged_triton' runs on a CUDA device .* got tensors on cpu"):
        backend.forward(q, kv, kv, k_cache, v_cache, meta, 0.25)


@pytest.mark.parametrize("kv_cache", ["paged", "virtual"])
def test_triton_backend_in_the_engine_matches_hf(kv_cache: str, hf_smollm: GreedyFn) -> None:
    """SmolLM2 in float32 through the Triton kernel: HF transformers' greedy tokens exactly."""
    llm = LLM(
        attention_backend="paged_triton",
        kv_cache=kv_cache,
        kv_cache_memory_bytes=64 * 2**20,
        dtype="float32",
        device=DEVICE.type,
    )
    assert llm.engine._local_core().worker.attention.name == "paged_triton"
    check_against_hf(llm, TEXTS[:3], hf_smollm)


def test_triton_backend_chunked_prefill_over_shared_prefixes_matches_hf(hf_smollm: GreedyFn) -> None:
    """Prompt chunks of at most 16 tokens over a cached prefix (their own earlier chunks, and other
    requests' blocks), beside decodes in the same steps: HF's greedy tokens."""
    llm = LLM(
        attention_backend="paged_triton",
        max_num_batched_tokens=16,
        kv_cache_memory_bytes=64 * 2**20,
        dtype="float32",
        device=DEVICE.type,
    )
    outputs = check_against_hf(llm, TEXTS[:1] + SHARED[:2], hf_smollm)
    assert max(len(o.prompt_token_ids) for o in outputs) > 16
    assert sum(o.num_cached_tokens > 0 for o in outputs) >= 1
