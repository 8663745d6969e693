"""Shared fixtures: the HF transformers reference for the default model."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from kvos.model.loader import default_model_path

torch.manual_seed(0)

# Triton's kernels run in its interpreter where there is no GPU; Triton reads this when first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GreedyFn = Callable[[list[list[int]], int], list[list[int]]]


def hf_greedy_fn(model) -> GreedyFn:
    """Greedy continuation of each prompt alone (no padding), stopping at EOS like `generate`."""

    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def run(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        outs = []
        for ids in prompts:
            key = (tuple(ids), max_new_tokens)
            if key not in cache:
                with torch.inference_mode():
                    seq = model.generate(
                        torch.tensor([ids]),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                    )
                cache[key] = seq[0, len(ids) :].tolist()
            outs.append(cache[key])
        return outs

    return run


@pytest.fixture(scope="session")
def hf_smollm() -> GreedyFn:
    """transformers running the very same GGUF weights: the correctness reference."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32
    ).eval()
    return hf_greedy_fn(model)
