"""Every attention backend against a naive softmax(QK^T / sqrt(d)) V written out by hand.

The KV sits in a real virtual cache (each request's run of slots inside the
megacache or per-layer layout) or in a paged pool whose block tables are
scrambled; the cases mix a fresh prefill, a later prompt chunk and decodes of
different lengths, and the heads are grouped (GQA), so masking, positions,
block walks and head mapping are all checked, in float32 and bfloat16.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvos.attention import paged_cpu
from kvos.attention.backend import SeqLayout, make_backend
from kvos.core.request import Request
from kvos.extensions import cpu_flags
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


@pytest.mark.parametrize("backend_name", ["gather_sdpa", "contiguous", "paged"])
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
        table = kv.block_table(request)
        start = table[0] * kv.table_block_size
        slots = torch.arange(start, start + done + new)
        keys, values = torch.randn(done, NUM_KV_HEADS, HEAD_DIM), torch.randn(done, NUM_KV_HEADS, HEAD_DIM)
        k_cache[slots[:done]] = keys
        v_cache[slots[:done]] = values
        cached.append((keys, values))
        seqs.append(SeqLayout(row, new, done, slots, torch.tensor(table, dtype=torch.int32), kv.table_block_size))
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


# (tokens already cached, tokens computed this step). Past 16 query tokens the
# kernel tiles the queries, past 32 positions the keys, past 512 it splits the
# context into partitions and merges them.
PAGED_CASES = [(0, 7), (4, 5), (9, 1), (3, 1), (0, 1), (40, 1), (600, 1), (500, 40), (0, 35)]


def _paged_step(
    block_size: int,
    dtype: torch.dtype,
    cases: list[tuple[int, int]],
    head_dim: int = HEAD_DIM,
    num_kv_heads: int = NUM_KV_HEADS,
) -> tuple[list[SeqLayout], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Requests laid out in a paged pool through scrambled block tables, their cached KV written in place.

    Returns the layouts, each request's cached (keys, values), and the pool's K and V.
    """
    torch.manual_seed(0)
    num_blocks = [-(-(done + new) // block_size) for done, new in cases]
    # Block ids handed out in a random order, with spare blocks in between, so no table is a run.
    pool_blocks = 2 * sum(num_blocks) + 3
    order = torch.randperm(pool_blocks)
    k_cache = torch.zeros(pool_blocks * block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    seqs, cached = [], []
    row, used = 0, 0
    for (done, new), n in zip(cases, num_blocks):
        table = order[used : used + n].to(torch.int32)
        used += n
        slots = (table[:, None].long() * block_size + torch.arange(block_size)).flatten()[: done + new]
        keys = torch.randn(done, num_kv_heads, head_dim).to(dtype)
        values = torch.randn(done, num_kv_heads, head_dim).to(dtype)
        k_cache[slots[:done]] = keys
        v_cache[slots[:done]] = values
        cached.append((keys, values))
        seqs.append(SeqLayout(row, new, done, slots, table, block_size))
        row += new
    return seqs, cached, k_cache, v_cache


def _assert_matches_naive(
    got: torch.Tensor,
    seqs: list[SeqLayout],
    cached: list[tuple[torch.Tensor, torch.Tensor]],
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    tolerance: float,
) -> None:
    """Each request's output rows against naive attention over its cached KV and this step's."""
    q, k, v = qkv
    for seq, (keys, values) in zip(seqs, cached):
        rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
        all_keys, all_values = torch.cat([keys, k[rows]]), torch.cat([values, v[rows]])
        expected = naive_attention(q[rows].double(), all_keys, all_values, seq.num_computed)
        torch.testing.assert_close(got[rows].double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("backend_name", ["gather_sdpa", "paged"])
@pytest.mark.parametrize("block_size", [16, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_paged_cache_matches_naive_attention(
    backend_name: str, block_size: int, dtype: torch.dtype, head_dim: int
) -> None:
    """Scrambled tables over a paged pool; bfloat16 caches are checked to bfloat16's resolution.

    The kernel has its own code for head sizes 64 and 128 (unrolled at compile time) and
    one for any other size (16 here), so all three are checked.
    """
    seqs, cached, k_cache, v_cache = _paged_step(block_size, dtype, PAGED_CASES, head_dim)
    num_tokens = sum(s.num_tokens for s in seqs)
    q = torch.randn(num_tokens, NUM_HEADS, head_dim).to(dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, head_dim).to(dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, head_dim).to(dtype)

    backend = make_backend(backend_name)
    meta = backend.build_metadata(seqs, num_tokens, torch.device("cpu"))
    got = backend.forward(q, k, v, k_cache, v_cache, meta, head_dim**-0.5)

    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    _assert_matches_naive(got, seqs, cached, (q, k, v), tolerance)
    for seq in seqs:
        rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
        assert torch.equal(v_cache[seq.context_slots[seq.num_computed :]], v[rows])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(9, 3), (16, 2), (32, 2)])
@pytest.mark.parametrize("few", [False, True])
def test_paged_kernel_items_of_several_kv_heads_match_naive_attention(
    threads: int, dtype: torch.dtype, num_heads: int, num_kv_heads: int, few: bool
) -> None:
    """The kernel lets one work item read several kv heads of each slot when the batch has enough
    work per thread (`few=False`), and one head per item otherwise (`few=True`: one request).

    Shapes: SmolLM2's 9 query heads over 3 kv heads, whose 16-token prompt tiles take two heads
    and then one (a chunk of 17 after 20 cached: written straight out; 40 after 500: merged);
    8 query heads per kv head (the most the bfloat16 tiles take); 16 per kv head.
    """
    cases = [(600, 1)] if few else [*PAGED_CASES, (20, 17)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seqs, cached, k_cache, v_cache = _paged_step(16, dtype, cases, 64, num_kv_heads)
        num_tokens = sum(s.num_tokens for s in seqs)
        q = torch.randn(num_tokens, num_heads, 64).to(dtype)
        k = torch.randn(num_tokens, num_kv_heads, 64).to(dtype)
        v = torch.randn(num_tokens, num_kv_heads, 64).to(dtype)
        backend = make_backend("paged")
        meta = backend.build_metadata(seqs, num_tokens, torch.device("cpu"))
        got = backend.forward(q, k, v, k_cache, v_cache, meta, 64**-0.5)
    finally:
        torch.set_num_threads(previous)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    _assert_matches_naive(got, seqs, cached, (q, k, v), tolerance)


def test_paged_backend_reads_the_virtual_cache_through_one_entry_tables() -> None:
    """A virtual row is a table of one block as long as the row: the same walk, B = row length."""
    row_tokens = 64
    k_cache = torch.randn(4 * row_tokens, NUM_KV_HEADS, HEAD_DIM)
    v_cache = torch.randn_like(k_cache)
    # Requests on rows 2 and 0: a decode at position 50 and a chunk of 6 after 20 cached positions.
    seqs = [
        SeqLayout(0, 1, 50, torch.arange(2 * row_tokens, 2 * row_tokens + 51), torch.tensor([2]), row_tokens),
        SeqLayout(1, 6, 20, torch.arange(0, 26), torch.tensor([0], dtype=torch.int32), row_tokens),
    ]
    q = torch.randn(7, NUM_HEADS, HEAD_DIM)
    k, v = torch.randn(7, NUM_KV_HEADS, HEAD_DIM), torch.randn(7, NUM_KV_HEADS, HEAD_DIM)
    paged, contiguous = make_backend("paged"), make_backend("contiguous")
    got = paged.forward(q, k, v, k_cache, v_cache, paged.build_metadata(seqs, 7, torch.device("cpu")), 0.25)
    want = contiguous.forward(q, k, v, k_cache, v_cache, contiguous.build_metadata(seqs, 7, torch.device("cpu")), 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_paged_backend_names_missing_tables_and_bad_blocks() -> None:
    backend = make_backend("paged")
    bare = SeqLayout(0, 1, 3, torch.arange(4))
    with pytest.raises(ValueError, match="block_table and block_size"):
        backend.build_metadata([bare], 1, torch.device("cpu"))
    short = SeqLayout(0, 1, 20, torch.arange(21), torch.tensor([0], dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="covers 1 blocks of 16"):
        backend.build_metadata([short], 1, torch.device("cpu"))
    # Block 9 of 16 slots lies past a 64-slot cache: the kernel refuses rather than read outside it.
    outside = SeqLayout(0, 1, 3, torch.arange(4), torch.tensor([9], dtype=torch.int32), 16)
    meta = backend.build_metadata([outside], 1, torch.device("cpu"))
    cache = torch.zeros(64, NUM_KV_HEADS, HEAD_DIM)
    q, kv = torch.randn(1, NUM_HEADS, HEAD_DIM), torch.randn(1, NUM_KV_HEADS, HEAD_DIM)
    meta.slot_mapping = torch.tensor([3])
    with pytest.raises(ValueError, match="block 0 is block id 9, outside a cache of 4 blocks of 16"):
        backend.forward(q, kv, kv, cache, cache.clone(), meta, 0.25)


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*gather_sdpa"):
        make_backend("flash")


def test_whole_prompts_go_to_sdpa_without_avx512_or_with_amx() -> None:
    amd_zen4 = frozenset({"avx512f", "avx512_bf16", "avx512_vnni"})
    assert not paged_cpu.prompts_to_sdpa(True, amd_zen4)
    assert paged_cpu.prompts_to_sdpa(True, amd_zen4 | {"amx_tile", "amx_bf16"})
    assert paged_cpu.prompts_to_sdpa(False, frozenset({"avx2", "fma"}))


def test_bfloat16_items_run_on_the_tile_unit_where_the_cpu_has_amx() -> None:
    """On a CPU with AMX the naive-attention checks above run the kernel's AMX path (decodes and
    chunks of up to 16 query rows per kv head); a refused tile state would silently fall back."""
    paged_cpu.load_kernel()
    assert torch.ops.kvos.paged_attention_amx() == ({"amx_tile", "amx_bf16"} <= cpu_flags())


def test_paged_kernel_without_a_compiler_is_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path))  # no finished build to load instead
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(ValueError, match="'no-such-compiler\\+\\+' is not on PATH"):
        paged_cpu.load_kernel.__wrapped__()


@pytest.mark.parametrize("to_sdpa", [True, False])
def test_paged_step_of_whole_prompts_matches_naive_attention(to_sdpa: bool) -> None:
    """Prompts of 32+ tokens with nothing cached: through causal SDPA (a step of only those calls no
    kernel; what a CPU without AVX-512 or with AMX runs) or through the kernel's prompt tiles."""
    seqs, cached, k_cache, v_cache = _paged_step(16, torch.float32, [(0, 40), (0, 33)])
    num_tokens = sum(s.num_tokens for s in seqs)
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    backend = make_backend("paged")
    assert isinstance(backend, paged_cpu.PagedCPUBackend)
    backend.sdpa_for_prompts = to_sdpa
    meta = backend.build_metadata(seqs, num_tokens, torch.device("cpu"))
    assert meta.paged is not None and meta.paged.seqs.shape[0] == (0 if to_sdpa else len(seqs))
    assert len(meta.paged.prompts) == (len(seqs) if to_sdpa else 0)
    got = backend.forward(q, k, v, k_cache, v_cache, meta, HEAD_DIM**-0.5)
    _assert_matches_naive(got, seqs, cached, (q, k, v), 1e-5)  # nothing cached: the step's own keys
    for seq in seqs:
        rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
        assert torch.equal(k_cache[seq.context_slots], k[rows])


@pytest.mark.parametrize("to_sdpa", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_step_of_prompt_chunks_over_a_cached_prefix_matches_naive_attention(
    to_sdpa: bool, dtype: torch.dtype
) -> None:
    """Chunks of 32+ tokens over a cached prefix, beside a decode and a short chunk: with SDPA for
    prompts the long chunks attend their context gathered from the cache under the chunk's mask, the
    rest go to the kernel in the same step."""
    cases = [(20, 40), (500, 64), (3, 1), (9, 5), (0, 33)]
    seqs, cached, k_cache, v_cache = _paged_step(16, dtype, cases)
    num_tokens = sum(s.num_tokens for s in seqs)
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM).to(dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM).to(dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM).to(dtype)
    backend = make_backend("paged")
    assert isinstance(backend, paged_cpu.PagedCPUBackend)
    backend.sdpa_for_prompts = to_sdpa
    meta = backend.build_metadata(seqs, num_tokens, torch.device("cpu"))
    assert meta.paged is not None
    assert [(c.num_computed, c.num_tokens) for c in meta.paged.prompts] == (
        [(20, 40), (500, 64), (0, 33)] if to_sdpa else []
    )
    got = backend.forward(q, k, v, k_cache, v_cache, meta, HEAD_DIM**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    _assert_matches_naive(got, seqs, cached, (q, k, v), tolerance)


@pytest.mark.parametrize("lengths", [[3], [2, 2, 2], [1, 5, 3, 5, 2], [7, 1]])
def test_block_tables_pad_like_torchs_pad_sequence(lengths: list[int]) -> None:
    from kvos.attention.paged_cpu import pad_rows

    rows = [torch.arange(100 * i, 100 * i + n, dtype=torch.int32) for i, n in enumerate(lengths)]
    assert torch.equal(pad_rows(rows), torch.nn.utils.rnn.pad_sequence(rows, batch_first=True))
