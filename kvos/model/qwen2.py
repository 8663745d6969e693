"""Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections.

`ModelArch.attention_bias` is always True for Qwen2, so the Llama module is
reused as is; this class exists so the registry names the family.
"""

from __future__ import annotations

from kvos.attention.backend import AttentionBackend
from kvos.model.arch import ModelArch
from kvos.model.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, arch: ModelArch, max_positions: int, attention: AttentionBackend | None = None) -> None:
        if not arch.attention_bias:
            raise ValueError("Qwen2 models have q/k/v biases; the config says attention_bias=False")
        super().__init__(arch, max_positions, attention)
