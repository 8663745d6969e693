"""kvos: a readable LLM serving engine that runs KV memory like an operating system."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvos.entrypoints.llm import LLM
    from kvos.outputs import CompletionOutput, RequestOutput
    from kvos.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

_EXPORTS = {
    "LLM": "kvos.entrypoints.llm",
    "SamplingParams": "kvos.sampling_params",
    "RequestOutput": "kvos.outputs",
    "CompletionOutput": "kvos.outputs",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import kvos.config` (or the CLI's --help) does not pay for torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvos' has no attribute {name!r}")
