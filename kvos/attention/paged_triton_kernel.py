"""The Triton kernel of `kvos.attention.paged_triton` (its docstring says what a program does).

In a module of its own, imported on the backend's first launch: Triton's
interpreter finds `tl` among a kernel's module globals, and importing kvos
should not import Triton.
"""

import triton
import triton.language as tl


@triton.jit
def paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    part_ptr,
    ml_ptr,
    table_ptr,
    seqs_ptr,
    tiles_ptr,
    scale,
    stride_q_token,
    stride_q_head,
    stride_k_slot,
    stride_k_head,
    stride_v_slot,
    stride_v_head,
    stride_table,
    block_size,
    num_slots,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PARTITION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Without SPLIT: the tile's whole context, normalised into `o`. With SPLIT: positions
    [split * PARTITION, (split + 1) * PARTITION) only, unnormalised, into `part` (float32 rows) and
    `ml` (each row's running max and sum), for `merge_kernel`."""
    kv_head = tl.program_id(1)
    seq, first, num_tokens, token, q_offsets, row_mask = _tile_rows(
        tiles_ptr, seqs_ptr, stride_q_token, stride_q_head, GROUP, ROWS, HEAD_DIM, BLOCK_D, BLOCK_M
    )
    num_computed = tl.load(seqs_ptr + 3 * seq + 2)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + q_offsets, mask=row_mask, other=0.0)
    position = num_computed + token  # each row sees keys at positions <= its own
    last = tl.minimum(first + ROWS // GROUP, num_tokens) - 1
    context = num_computed + last + 1  # positions the tile's last row sees

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = table_ptr + seq.to(tl.int64) * stride_table
    lo = 0
    hi = context
    if SPLIT:
        lo = tl.program_id(2) * PARTITION
        hi = tl.minimum(context, lo + PARTITION)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < hi
        block = tl.load(table_row + pos // block_size, mask=pos_ok, other=0)
        slot = block.to(tl.int64) * block_size + pos % block_size
        # A table entry past the pool (a bug in the books) reads nothing rather than fault the GPU's
        # context, which would end every request on it; the position then weighs nothing.
        pos_ok = pos_ok & (slot < num_slots) & (slot >= 0)
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(
            k_ptr + slot[:, None] * stride_k_slot + kv_head * stride_k_head + dims[None, :], mask=kv_mask, other=0.0
        )
        scores = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale
        visible = (pos[None, :] <= position[:, None]) & pos_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        # A row with nothing visible yet (past its request's tokens) keeps a finite reference.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_ref[:, None])
        alpha = tl.exp(m - m_ref)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + slot[:, None] * stride_v_slot + kv_head * stride_v_head + dims[None, :], mask=kv_mask, other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        m = m_new
    if SPLIT:
        row_offsets = _scratch_rows(tl.program_id(2), tl.num_programs(2), BLOCK_M)
        tl.store(part_ptr + row_offsets[:, None] * BLOCK_D + dims[None, :], acc)
        tl.store(ml_ptr + 2 * row_offsets, m)
        tl.store(ml_ptr + 2 * row_offsets + 1, l_sum)
    else:
        _store_normalised(o_ptr, q_offsets, row_mask, acc, l_sum)


@triton.jit
def merge_kernel(
    o_ptr,
    part_ptr,
    ml_ptr,
    seqs_ptr,
    tiles_ptr,
    num_splits,
    stride_q_token,
    stride_q_head,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One (tile, kv head)'s partitions merged: each rescaled to the largest running max, summed, normalised."""
    _, _, _, _, o_offsets, row_mask = _tile_rows(
        tiles_ptr, seqs_ptr, stride_q_token, stride_q_head, GROUP, ROWS, HEAD_DIM, BLOCK_D, BLOCK_M
    )
    dims = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for split in range(0, num_splits):
        m = tl.maximum(m, tl.load(ml_ptr + 2 * _scratch_rows(split, num_splits, BLOCK_M)))
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(0, num_splits):
        row_offsets = _scratch_rows(split, num_splits, BLOCK_M)
        weight = tl.exp(tl.load(ml_ptr + 2 * row_offsets) - m_ref)
        l_sum += weight * tl.load(ml_ptr + 2 * row_offsets + 1)
        acc += weight[:, None] * tl.load(part_ptr + row_offsets[:, None] * BLOCK_D + dims[None, :])
    _store_normalised(o_ptr, o_offsets, row_mask, acc, l_sum)


@triton.jit
def _tile_rows(
    tiles_ptr,
    seqs_ptr,
    stride_q_token,
    stride_q_head,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The program's tile (axis 0) of its kv head (axis 1): its request, the request's first token in the
    tile and its token count, each row's query token, and each row's (token, head, dim) offsets in q and o
    with the mask of the rows and dims that exist. Row r is token r // GROUP, head r % GROUP."""
    seq = tl.load(tiles_ptr + 2 * tl.program_id(0))
    first = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1).to(tl.int64)
    token_start = tl.load(seqs_ptr + 3 * seq)
    num_tokens = tl.load(seqs_ptr + 3 * seq + 1)
    rows = tl.arange(0, BLOCK_M)
    token = first + rows // GROUP
    head = tl.program_id(1) * GROUP + rows % GROUP
    dims = tl.arange(0, BLOCK_D)
    offsets = (token_start + token)[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :]
    mask = ((rows < ROWS) & (token < num_tokens))[:, None] & (dims < HEAD_DIM)[None, :]
    return seq, first, num_tokens, token, offsets, mask


@triton.jit
def _scratch_rows(split, num_splits, BLOCK_M: tl.constexpr):
    """Where partition `split` of this program's (tile, kv head) keeps its rows in the split launch's
    scratch, laid out [tile][kv head][split][row]: int64 row indices."""
    unit = ((tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * num_splits + split).to(tl.int64)
    return unit * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _store_normalised(o_ptr, offsets, mask, acc, l_sum):
    """A tile's accumulated rows divided by their softmax sums (rows that saw nothing stay 0), into o."""
    acc = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    tl.store(o_ptr + offsets, acc.to(o_ptr.dtype.element_ty), mask=mask)
