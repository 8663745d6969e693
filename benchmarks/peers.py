"""The engines kvos is compared with, and what they share, all from one GGUF file.

Hugging Face transformers dequantizes the GGUF to float32 (as kvos does), so
it does the same arithmetic; llama.cpp computes on the quantized weights
directly, so it reads about 5x fewer weight bytes per token. Their packages are
benchmark-only: they are imported here, inside functions, never by kvos.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from kvos.model.arch import ModelArch
from kvos.model.gguf_loader import gguf_hf_config, gguf_tokenizer, open_gguf
from kvos.model.loader import default_model_path
from kvos.model.tokenizer import Tokenizer


def resolve_gguf(model: str | None) -> Path:
    """The .gguf file every engine loads: `model`, or kvos's default model."""
    path = Path(model) if model is not None else Path(default_model_path())
    if path.suffix != ".gguf" or not path.is_file():
        raise ValueError(f"model must be an existing .gguf file, got {str(path)!r}")
    return path


def arch_from_gguf(gguf_path: Path) -> ModelArch:
    """The model's shape, read with kvos's own GGUF parser (the roofline needs it)."""
    return ModelArch.from_hf_config(gguf_hf_config(open_gguf(gguf_path)))


def load_tokenizer(gguf_path: Path) -> Tokenizer:
    """kvos's tokenizer, which turns every benchmark prompt into the ids all engines get.

    Not transformers' GGUF tokenizer: that one splits whitespace before digits
    differently from the model's own tokenizer.json (e.g. "\\n\\n 1" becomes
    "\\n\\n", " ", "1" instead of "\\n\\n ", "1").
    """
    return gguf_tokenizer(open_gguf(gguf_path))


def load_hf_model(gguf_path: Path) -> Any:
    """The GGUF dequantized to float32 (loading a GGUF needs `accelerate` installed)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python version, or None when it is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        import llama_cpp
    except (OSError, RuntimeError):
        # Installed on a shared llama.cpp build (scripts/build_peers.sh) without LLAMA_CPP_LIB_PATH set.
        return None

    return str(llama_cpp.__version__)


def load_llama_cpp(gguf_path: Path, n_ctx: int, n_threads: int) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads, logits_all=False, verbose=False)
