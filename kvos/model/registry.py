"""Which module runs which architecture."""

from __future__ import annotations

from kvos.attention.backend import AttentionBackend
from kvos.model.arch import ModelArch
from kvos.model.llama import LlamaForCausalLM
from kvos.model.qwen2 import Qwen2ForCausalLM

_MODELS: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}


def build_model(arch: ModelArch, max_positions: int, attention: AttentionBackend | None = None) -> LlamaForCausalLM:
    try:
        cls = _MODELS[arch.architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {arch.architecture!r}; kvos runs {', '.join(sorted(_MODELS))}"
        ) from None
    return cls(arch, max_positions, attention)
