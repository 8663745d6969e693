"""Tiny random Hugging Face checkpoints, for tests that compare kvos with transformers.

Real checkpoints cannot be downloaded here; a 2-layer random model saved with
transformers' own `save_pretrained` exercises the same loading and forward
code paths in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvos.config import ModelConfig
from kvos.model.loader import load_model
from kvos.model.tokenizer import Tokenizer

TINY_GGUF_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def default_tokenizer() -> Tokenizer:
    """The default model's (SmolLM2) tokenizer, from the kvos cache."""
    return load_model(ModelConfig()).tokenizer


def make_tiny_hf_model(tmp_dir: str | Path, arch: str, seed: int = 0, **config_overrides: Any) -> str:
    """Save a random `arch` model ("llama", "qwen2" or "mistral") with the default tokenizer; return its folder.

    Shape: hidden 64, 2 layers, 4 heads, 2 KV heads, vocab = the default
    tokenizer's (49152), untied lm_head; `config_overrides` replace any config
    field (e.g. `tie_word_embeddings=True`, `rope_scaling={...}`). The folder
    is `tmp_dir/tiny-<arch>` and loads with both `kvos.model.loader.load_model`
    and `transformers.AutoModelForCausalLM.from_pretrained`.
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"arch must be one of {', '.join(classes)}, got {arch!r}")
    tokenizer = default_tokenizer()
    config_cls, model_cls = classes[arch]
    settings: dict[str, Any] = {
        **TINY_SHAPE,
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": list(tokenizer.eos_token_ids),
        "tie_word_embeddings": False,
        **config_overrides,
    }
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings)).eval()
    folder = Path(tmp_dir) / f"tiny-{arch}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def make_tiny_gguf(tmp_dir: str | Path, arch: str, seed: int = 0) -> tuple[str, dict[str, torch.Tensor]]:
    """Write a random 2-layer `arch` ("llama" or "qwen2") model as llama.cpp's converter would.

    Returns the .gguf path and the HF state dict it was made from. Weights are
    F32 (so a loader must give them back exactly) and, for llama, Q/K rows are
    permuted the way llama.cpp permutes them. The vocabulary is 3 control
    tokens + the 256 byte tokens + 2 merges, with `tokenizer.ggml.pre` "smollm"
    for llama and "qwen2" for qwen2. The lm_head is untied.
    """
    import gguf

    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be llama or qwen2, got {arch!r}")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*specials, *_byte_alphabet(), "Ġt", "he"]
    shape = TINY_SHAPE
    hidden, heads, kv_heads = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(seed)

    def rand(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=generator) * 0.1

    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": rand(len(tokens), hidden),
        "model.norm.weight": 1 + rand(hidden),
        "lm_head.weight": rand(len(tokens), hidden),
    }
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": 1 + rand(hidden),
            p + "post_attention_layernorm.weight": 1 + rand(hidden),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(shape["intermediate_size"], hidden),
            p + "mlp.up_proj.weight": rand(shape["intermediate_size"], hidden),
            p + "mlp.down_proj.weight": rand(hidden, shape["intermediate_size"]),
        }
        if arch == "qwen2":
            state |= {
                p + "self_attn.q_proj.bias": rand(heads * head_dim),
                p + "self_attn.k_proj.bias": rand(kv_heads * head_dim),
                p + "self_attn.v_proj.bias": rand(kv_heads * head_dim),
            }

    path = Path(tmp_dir) / f"tiny-{arch}.F32.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(shape["num_hidden_layers"])
    writer.add_context_length(shape["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(shape["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_GGUF_CHAT_TEMPLATE)
    for name, tensor in state.items():
        data = tensor.numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if "q_proj" in name else kv_heads
            data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path), state


def _gguf_name(hf_name: str) -> str:
    """llama.cpp's name for an HF parameter (the inverse of kvos's mapping, written out independently)."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{parts[module]}.{kind}"
