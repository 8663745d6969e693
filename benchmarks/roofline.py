"""How fast could this machine possibly serve a workload? A roofline bound.

Benchmarks report "% of limit" against this bound, so a figure says how much
of the hardware an engine uses, not only how it compares with a peer. Two
numbers describe the machine: the best sustained dense GEMM rate (FLOP/s) and
the memory read bandwidth (bytes/s). A step of the model can finish no sooner
than its matmul FLOPs at the GEMM rate, nor sooner than the bytes it must read
(every weight once per step, plus the KV cache in decode) at the bandwidth.

The machine is measured once and cached in ~/.cache/kvos/roofline-<host>.json
(`--remeasure` measures again), because a careful measurement takes a while.

Usage: python -m benchmarks.roofline [--device cpu|cuda] [--remeasure] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def kvos_gemm_dtype(dtype: str, quantization: str | None) -> str:
    """The dtype whose GEMM peak bounds kvos's matmuls, else `dtype`.

    kvos's int4 kernels multiply in int8 (integer dot products) on VNNI CPUs, and where the CPU has
    AMX in bfloat16 on the tile unit from `int4_kernel.AMX_MIN_ROWS` rows: every batch whose GEMMs
    could reach a peak runs there (fewer rows are bound by reading the weights).
    """
    from kvos.model import int4_kernel

    if quantization == "int4" and int4_kernel.supported():
        return "bfloat16" if int4_kernel.amx_supported() else "int8"
    return dtype


def kvos_weight_bytes_per_param(dtype: str, quantization: str | None, rows: int) -> float:
    """Bytes kvos reads per parameter in a step of `rows` token rows.

    int4 keeps 4-bit codes plus a 2-byte scale and minimum per group of 32, int8 one byte. PyTorch's
    kernels run only up to `DEFAULT_MAX_QUANTIZED_ROWS` rows and a GEMM on the bfloat16
    dequantized copy above that; kvos's int4 kernel (AVX512-VNNI CPUs) runs every batch
    (kvos/model/quantization.py).
    """
    from kvos.config import DTYPE_BYTES
    from kvos.model import int4_kernel
    from kvos.model.quantization import DEFAULT_MAX_QUANTIZED_ROWS

    if quantization is None:
        return float(DTYPE_BYTES[dtype])
    own_kernel = quantization == "int4" and int4_kernel.supported()
    if rows > DEFAULT_MAX_QUANTIZED_ROWS[quantization] and not own_kernel:
        return 2.0
    return {"int8": 1.0, "int4": 0.5 + 4 / 32}[quantization]


@dataclass(frozen=True)
class ArchShape:
    """The parts of a decoder-only transformer that set its FLOPs and bytes.

    Names follow Hugging Face configs, so `from_any` accepts kvos's ModelArch,
    a transformers PretrainedConfig or a plain dict alike.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = True

    @classmethod
    def from_any(cls, arch: object) -> ArchShape:
        def get(name: str, default: object = None) -> object:
            value = arch.get(name, default) if isinstance(arch, Mapping) else getattr(arch, name, default)
            if value is None:
                raise ValueError(f"arch is missing {name!r}")
            return value

        hidden_size = int(get("hidden_size"))
        num_attention_heads = int(get("num_attention_heads"))
        head_dim = (
            arch.get("head_dim") if isinstance(arch, Mapping) else getattr(arch, "head_dim", None)
        ) or hidden_size // num_attention_heads
        return cls(
            hidden_size=hidden_size,
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=num_attention_heads,
            num_key_value_heads=int(get("num_key_value_heads", num_attention_heads)),
            head_dim=int(head_dim),
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", True)),
        )

    @property
    def linear_params_per_layer(self) -> int:
        """q, k, v, o projections and the gated MLP (gate, up, down)."""
        h, q_dim, kv_dim = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        )
        return h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * self.intermediate_size

    @property
    def num_params(self) -> int:
        """All parameters: embedding, layers (with their two norms), final norm, LM head if untied."""
        embedding = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embedding
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        return embedding + lm_head + norms + self.num_hidden_layers * self.linear_params_per_layer

    @property
    def params_read_per_step(self) -> int:
        """Parameters every forward pass streams from memory.

        An untied input embedding is only gathered row by row, so it is left
        out; a tied one is read whole as the LM head.
        """
        untied_embedding = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_params - untied_embedding

    def kv_bytes_per_token(self, kv_bytes_per_elem: int) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * kv_bytes_per_elem

    def linear_flops_per_token(self) -> int:
        return 2 * self.num_hidden_layers * self.linear_params_per_layer

    def lm_head_flops(self) -> int:
        """One row of logits: only the last position of each sequence needs one."""
        return 2 * self.hidden_size * self.vocab_size

    def attention_flops(self, num_keys: int) -> int:
        """One query attending `num_keys` keys in every layer: QK^T and PV, 2 FLOPs per MAC each."""
        return 4 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * num_keys

    def prefill_flops(self, prompt_len: int) -> int:
        """Causal prefill: query i (1-based) attends i keys, so sum(i) = n(n+1)/2 key visits."""
        n = prompt_len
        return n * self.linear_flops_per_token() + self.lm_head_flops() + self.attention_flops(n * (n + 1) // 2)

    def decode_flops(self, context_len: int) -> int:
        """One new token whose query attends `context_len` keys (itself included)."""
        return self.linear_flops_per_token() + self.lm_head_flops() + self.attention_flops(context_len)


# SmolLM2-135M-Instruct, kvos's default model: the shape the benchmarks run.
SMOLLM2_135M = ArchShape(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class MachinePeak:
    """What one device of this machine sustains, measured with torch."""

    device: str
    device_name: str
    dtype: str
    num_threads: int
    peak_flops: float
    read_bandwidth: float
    gemm_flops: dict[str, float] = field(default_factory=dict)
    measured_on: str = ""
    hostname: str = ""
    torch_version: str = ""


@dataclass(frozen=True)
class RooflineEstimate:
    prefill_s: float
    decode_s: float
    total_s: float


@dataclass(frozen=True)
class Roofline:
    """Lower bounds on step and workload time for one model on one machine."""

    arch: ArchShape
    peak_flops: float
    read_bandwidth: float
    kv_bytes_per_elem: int = 4

    def __post_init__(self) -> None:
        if self.peak_flops <= 0 or self.read_bandwidth <= 0:
            raise ValueError(
                f"peak_flops and read_bandwidth must be > 0, got {self.peak_flops} and {self.read_bandwidth}"
            )
        if self.kv_bytes_per_elem < 1:
            raise ValueError(f"kv_bytes_per_elem must be >= 1, got {self.kv_bytes_per_elem}")

    @classmethod
    def for_machine(cls, arch: object, machine: MachinePeak, kv_bytes_per_elem: int = 4) -> Roofline:
        return cls(ArchShape.from_any(arch), machine.peak_flops, machine.read_bandwidth, kv_bytes_per_elem)

    def weight_bytes(self, weight_bytes_per_param: float) -> float:
        return self.arch.params_read_per_step * weight_bytes_per_param

    def prefill_step_seconds(self, prompt_lens: Sequence[int], weight_bytes_per_param: float) -> float:
        """One step prefilling whole prompts: compute-bound unless prompts are tiny."""
        flops = sum(self.arch.prefill_flops(n) for n in prompt_lens)
        return max(flops / self.peak_flops, self.weight_bytes(weight_bytes_per_param) / self.read_bandwidth)

    def decode_step_seconds(self, context_lens: Sequence[int], weight_bytes_per_param: float) -> float:
        """One decode step: every weight and every sequence's KV cache is read once."""
        flops = sum(self.arch.decode_flops(c) for c in context_lens)
        kv_bytes = sum(context_lens) * self.arch.kv_bytes_per_token(self.kv_bytes_per_elem)
        memory_bytes = self.weight_bytes(weight_bytes_per_param) + kv_bytes
        return max(flops / self.peak_flops, memory_bytes / self.read_bandwidth)

    def lower_bound_seconds(
        self, requests: Sequence[tuple[int, int]], max_batch: int, weight_bytes_per_param: float
    ) -> RooflineEstimate:
        """Time to serve (prompt_len, output_len) requests under coarse continuous batching.

        Each iteration admits waiting requests first-come first-served while
        fewer than `max_batch` run, prefills them in one step (which yields
        their first token), then runs one decode step over all running
        requests. The bound is coarse: a real engine may fuse prefill with
        decode (saving one weight read per admission) or chunk long prompts.
        """
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if weight_bytes_per_param <= 0:
            raise ValueError(f"weight_bytes_per_param must be > 0, got {weight_bytes_per_param}")
        for prompt_len, output_len in requests:
            if prompt_len < 1 or output_len < 1:
                raise ValueError(f"requests need prompt_len >= 1 and output_len >= 1, got {(prompt_len, output_len)}")

        waiting = deque(requests)
        running: list[tuple[int, int]] = []  # (keys the next query attends, tokens still to decode)
        prefill_s = decode_s = 0.0
        while waiting or running:
            admitted = [waiting.popleft() for _ in range(min(len(waiting), max_batch - len(running)))]
            if admitted:
                prefill_s += self.prefill_step_seconds([p for p, _ in admitted], weight_bytes_per_param)
                running += [(p + 1, o - 1) for p, o in admitted if o > 1]
            if running:
                decode_s += self.decode_step_seconds([c for c, _ in running], weight_bytes_per_param)
                running = [(c + 1, left - 1) for c, left in running if left > 1]
        return RooflineEstimate(prefill_s=prefill_s, decode_s=decode_s, total_s=prefill_s + decode_s)


def percent_of_limit(measured_s: float, bound_s: float) -> float:
    """How close a measured time comes to the roofline: 100 means at the limit."""
    if measured_s <= 0:
        raise ValueError(f"measured_s must be > 0, got {measured_s}")
    return 100.0 * bound_s / measured_s


def _sustained_rate(
    run: Callable[[], object], work: float, synchronize: Callable[[], None], min_seconds: float
) -> float:
    """Best of three timed loops of at least `min_seconds`, in work units per second."""
    run()
    synchronize()
    best = 0.0
    for _ in range(3):
        iterations = 0
        start = time.perf_counter()
        while True:
            run()
            iterations += 1
            synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = max(best, work * iterations / elapsed)
    return best


def model_gemm_shapes(arch: ArchShape, batch_sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(M, K, N) of the model's projections at decode-like and prefill-like M."""
    h = arch.hidden_size
    weights = [
        (h, arch.num_attention_heads * arch.head_dim),
        (h, arch.intermediate_size),
        (arch.intermediate_size, h),
        (h, arch.vocab_size),
    ]
    return [(m, k, n) for m in batch_sizes for k, n in weights]


def measure_machine(
    device: str = "cpu", arch: ArchShape = SMOLLM2_135M, min_seconds: float = 0.25, dtype: str | None = None
) -> MachinePeak:
    """Measure the GEMM rate (square and model shapes) and read bandwidth of one device, in `dtype`
    (default: bfloat16 on CUDA, float32 on CPU): the peak of the dtype the engine's GEMMs run in.

    "int8" is the integer GEMM (`torch._int_mm`, int8 x int8 -> int32; VNNI on CPUs that have it),
    the rate kvos's int4 kernel's integer dot products could at best reach: its operations count
    as FLOPs. Its bandwidth is read from a float32 tensor."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
        torch_dtype, square, bandwidth_bytes = _torch_dtype(dtype or "bfloat16"), 8192, 2 << 30
        synchronize = torch.cuda.synchronize
        device_name = torch.cuda.get_device_name()
        batch_sizes: Sequence[int] = (1, 64, 256, 2048)
    elif device == "cpu":
        torch_dtype, square, bandwidth_bytes = _torch_dtype(dtype or "float32"), 2048, 512 << 20
        synchronize = _no_sync
        device_name = _cpu_model_name()
        batch_sizes = (1, 16, 64, 256)
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")

    integer = torch_dtype == torch.int8
    read_dtype = torch.float32 if integer else torch_dtype
    bandwidth_elems = bandwidth_bytes // read_dtype.itemsize
    gemm_flops: dict[str, float] = {}
    shapes = [(square, square, square)] + model_gemm_shapes(arch, batch_sizes)
    with torch.inference_mode():
        for m, k, n in shapes:
            if integer:
                a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
                b = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=device)
            else:
                a = torch.randn(m, k, dtype=torch_dtype, device=device)
                b = torch.randn(k, n, dtype=torch_dtype, device=device)
            matmul = torch._int_mm if integer else torch.matmul
            rate = _sustained_rate(partial(matmul, a, b), 2.0 * m * k * n, synchronize, min_seconds)
            gemm_flops[f"{m}x{k}x{n}"] = rate
            logger.info("GEMM %dx%dx%d: %.1f GFLOP/s", m, k, n, rate / 1e9)
            del a, b
        big = torch.ones(bandwidth_elems, dtype=read_dtype, device=device)
        bandwidth = _sustained_rate(big.sum, float(big.numel() * big.element_size()), synchronize, min_seconds)
        logger.info("read bandwidth: %.1f GB/s", bandwidth / 1e9)
        del big
    return MachinePeak(
        device=device,
        device_name=device_name,
        dtype=str(torch_dtype).removeprefix("torch."),
        num_threads=torch.get_num_threads() if device == "cpu" else 0,
        peak_flops=max(gemm_flops.values()),
        read_bandwidth=bandwidth,
        gemm_flops=gemm_flops,
        measured_on=datetime.date.today().isoformat(),
        hostname=socket.gethostname(),
        torch_version=torch.__version__,
    )


def _no_sync() -> None:
    """CPU kernels are synchronous: nothing to wait for."""


def _cpu_model_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def default_cache_path() -> Path:
    return Path.home() / ".cache" / "kvos" / f"roofline-{socket.gethostname()}.json"


def _torch_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16", "float16", "int8"):
        raise ValueError(f"dtype must be float32, bfloat16, float16 or int8, got {name!r}")
    return getattr(torch, name)


def load_or_measure(
    device: str = "cpu", remeasure: bool = False, cache_path: Path | None = None, dtype: str | None = None
) -> MachinePeak:
    """The cached measurement of `device` (in `dtype`; None: the device's default) on this host,
    measuring it when absent or asked to."""
    path = cache_path if cache_path is not None else default_cache_path()
    cached: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    key = device if dtype is None else f"{device}-{dtype}"
    if not remeasure and key in cached:
        return MachinePeak(**cached[key])
    logger.info("measuring the %s roofline (cached afterwards in %s)", key, path)
    peak = measure_machine(device) if dtype is None else measure_machine(device, dtype=dtype)
    cached[key] = asdict(peak)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=2) + "\n")
    return peak


def format_report(peak: MachinePeak, roofline: Roofline, weight_bytes_per_param: float) -> str:
    lines = [
        f"device          {peak.device} ({peak.device_name}), {peak.dtype}, threads={peak.num_threads or '-'}",
        f"measured on     {peak.measured_on} on {peak.hostname}, torch {peak.torch_version}",
        f"peak GEMM       {peak.peak_flops / 1e9:.1f} GFLOP/s (best sustained over the shapes below)",
        f"read bandwidth  {peak.read_bandwidth / 1e9:.1f} GB/s",
        "",
        f"{'GEMM MxKxN':>22}  GFLOP/s",
    ]
    lines += [f"{shape:>22}  {rate / 1e9:8.1f}" for shape, rate in peak.gemm_flops.items()]
    lines += ["", f"decode upper bound for the default model ({weight_bytes_per_param:g} bytes/param weights):"]
    for batch in (1, 16, 64):
        step_s = roofline.decode_step_seconds([512] * batch, weight_bytes_per_param)
        lines.append(f"  batch {batch:>3}, context 512: {batch / step_s:9.1f} tokens/s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--remeasure", action="store_true", help="ignore the cached measurement")
    parser.add_argument("--cache-path", type=Path, default=None, help="default: ~/.cache/kvos/roofline-<host>.json")
    parser.add_argument("--weight-bytes-per-param", type=float, default=4.0, help="4 = float32 weights")
    parser.add_argument("--json", action="store_true", help="print the measurement as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    peak = load_or_measure(args.device, remeasure=args.remeasure, cache_path=args.cache_path)
    if args.json:
        print(json.dumps(asdict(peak), indent=2))
        return
    print(format_report(peak, Roofline.for_machine(SMOLLM2_135M, peak), args.weight_bytes_per_param))


if __name__ == "__main__":
    main()
