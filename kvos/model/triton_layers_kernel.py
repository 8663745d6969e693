"""The Triton kernels of `kvos.model.triton_layers` (its docstring says what they compute).

In a module of their own, imported on first use: Triton's interpreter finds
`tl` among a kernel's module globals, and importing kvos should not import
Triton.

Every rounding to bfloat16 goes through `round_bf16` (nearest, ties to even,
on the float32 bits, as csrc/layer_ops.cpp rounds): a compiled cast rounds
that way too, but Triton's interpreter truncates, and the tests run there.
"""

import triton
import triton.language as tl


@triton.jit
def round_bf16(x):
    """float32 -> the nearest bfloat16 (ties to even), kept as float32; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps, BLOCK: tl.constexpr):
    """One row per program: w * bf16(x * rsqrt(mean(x^2) + eps)), the sum in float32."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = round_bf16(x * inv_rms)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, round_bf16(w * normed).to(tl.bfloat16), mask=mask)


@triton.jit
def silu_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, half, BLOCK: tl.constexpr):
    """A block of one row per program: bf16(bf16(silu(gate)) * up) over the row's gate | up halves."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < half
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + half + cols, mask=mask, other=0.0).to(tl.float32)
    silu = round_bf16(gate / (1.0 + tl.exp(-gate)))
    tl.store(out_ptr + row * stride_out + cols, round_bf16(silu * up).to(tl.bfloat16), mask=mask)


@triton.jit
def rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    stride_x_token,
    stride_x_head,
    stride_out_token,
    stride_out_head,
    stride_table,
    head_dim,
    BLOCK: tl.constexpr,
):
    """One (token, head) per program: bf16(bf16(x * cos) + bf16(roll(x, D/2) * sin_rotated))."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    mask = d < head_dim
    half = head_dim // 2
    src = x_ptr + token * stride_x_token + head * stride_x_head
    x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    rolled = tl.load(src + tl.where(d < half, d + half, d - half), mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * stride_table + d, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_table + d, mask=mask, other=0.0).to(tl.float32)
    a = round_bf16(x * cos)
    b = round_bf16(rolled * sin)
    tl.store(
        out_ptr + token * stride_out_token + head * stride_out_head + d,
        round_bf16(a + b).to(tl.bfloat16),
        mask=mask,
    )
