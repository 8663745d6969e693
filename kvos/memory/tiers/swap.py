"""Swap or recompute: what preemption does with a victim's KV.

    swap       copy the victim's KV to the host tier now and back on resume:
                   2 x tokens x bytes_per_token / copy bandwidth
    recompute  drop it and run the tokens through the model again on resume:
                   (2 x parameters x tokens + 2 x layers x q_dim x tokens^2) / FLOP rate
               (the second term is causal attention over the recomputed prefix)

`auto` picks the cheaper by these estimates, per victim. Both rates are
measured once at start-up (`measure_swap_cost`): a large copy between the
primary pool's device and host memory, and a square matmul in the model's
dtype. The estimates ignore that a recompute shares its step with other
requests' work and that a swap-in waits for no one, so they lean towards
recompute; on every machine kvos has met swap still wins by orders of
magnitude for any prompt longer than a few tokens (on CPU a token's KV is tens
of KB against hundreds of MFLOPs to recompute it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvos.config import PreemptionMode


@dataclass(frozen=True)
class SwapCost:
    """The rates and sizes the auto rule weighs."""

    copy_bytes_per_s: float
    flops_per_s: float
    bytes_per_token: int
    num_parameters: int
    num_layers: int
    q_dim: int
    """Query width (heads x head_dim): sets the attention FLOPs of a recompute."""

    def swap_seconds(self, num_tokens: int) -> float:
        return 2 * num_tokens * self.bytes_per_token / self.copy_bytes_per_s

    def recompute_seconds(self, num_tokens: int) -> float:
        flops = 2 * self.num_parameters * num_tokens + 2 * self.num_layers * self.q_dim * num_tokens**2
        return flops / self.flops_per_s


@dataclass(frozen=True)
class PreemptionRule:
    """Decides per victim whether its KV is swapped to the host tier or recomputed."""

    mode: PreemptionMode
    cost: SwapCost | None = None

    def __post_init__(self) -> None:
        if self.mode == "auto" and self.cost is None:
            raise ValueError("preemption_mode='auto' needs a SwapCost to weigh swap against recompute")

    def chooses_swap(self, num_computed_tokens: int) -> bool:
        if num_computed_tokens == 0 or self.mode == "recompute":
            return False
        if self.mode == "swap":
            return True
        assert self.cost is not None
        return self.cost.swap_seconds(num_computed_tokens) < self.cost.recompute_seconds(num_computed_tokens)


def measure_copy_bandwidth(device: torch.device, num_bytes: int = 32 * 2**20) -> float:
    """Bytes/s of one large copy from `device` into host memory (pinned when `device` is CUDA); best of 3."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    best = float("inf")
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return num_bytes / max(best, 1e-9)


def measure_flops(device: torch.device, dtype: torch.dtype, n: int = 512) -> float:
    """FLOP/s of an n x n matmul in the model's dtype; best of 3 (a warm-up run first)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / max(best, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
