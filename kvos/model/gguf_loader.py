"""Read a llama.cpp GGUF file as an HF config, HF-named float32 weights and a tokenizer.

Everything is translated into Hugging Face's terms at this boundary, so the
rest of kvos (and the loader's cache, which stores the result as an ordinary
HF folder) has one vocabulary. Two llama.cpp conventions are undone here:

* tensor names (`blk.0.attn_q.weight` -> `model.layers.0.self_attn.q_proj.weight`);
* the row order of Q and K in llama-family files. llama.cpp's converter
  permutes those rows so its rotary kernel can rotate adjacent pairs
  (x0, x1), (x2, x3)...; HF's rotary rotates the two halves of each head.
  Qwen2 files are not permuted (llama.cpp uses the half-split "neox" rotary
  for them already).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tqdm import tqdm

from kvos.model.arch import ModelArch
from kvos.model.tokenizer import Tokenizer

# GGUF general.architecture -> HF model_type.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# Rotary pairs are interleaved by llama.cpp's converter only for these.
_PERMUTED_ARCHITECTURES = {"llama"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# Split regexes of HF's tokenizer.json for each llama.cpp `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CONTROL = 3
_USER_DEFINED = 4


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Parse the header and memory-map the tensor data (no dequantization yet)."""
    return gguf.GGUFReader(str(path))


def gguf_hf_config(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The file's metadata as an HF `config.json` dict (parsed by `ModelArch.from_hf_config`)."""
    gguf_arch = _field(reader, "general.architecture")
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {gguf_arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    model_type = GGUF_ARCHITECTURES[gguf_arch]

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{gguf_arch}.{name}", default)

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(
            "GGUF stores per-frequency rope factors (rope_freqs, Llama 3.1 style), "
            "which kvos cannot express; load the original HF folder instead"
        )
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rope_dims = int(key("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"partial rotary (rope.dimension_count {rope_dims} != head_dim {head_dim}) is not supported")
    vocab_size = key("vocab_size")
    if vocab_size is None:
        vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)

    config: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(_eos_ids(reader)),
    }
    scaling_type = key("rope.scaling.type")
    if scaling_type not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor", 1.0))}
        original = key("rope.scaling.original_context_length")
        if original is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    return config


def gguf_state_dict(reader: gguf.GGUFReader, arch: ModelArch) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32 under its HF name, with Q/K rows un-permuted."""
    gguf_arch = _field(reader, "general.architecture")
    permuted = gguf_arch in _PERMUTED_ARCHITECTURES
    state: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False):
        name = hf_tensor_name(tensor.name)
        weights = dequantize(tensor.data, tensor.tensor_type)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weights = _unpermute_rotary(weights, arch.num_attention_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weights = _unpermute_rotary(weights, arch.num_key_value_heads)
        # F32 tensors come back as read-only views of the file's memory map; own a copy.
        state[name] = torch.from_numpy(np.require(weights, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
    return state


def gguf_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer the file describes, as HF's tokenizer.json has it."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {model!r}; only byte-level BPE ('gpt2') is supported")
    tokens: list[str] = reader.fields["tokenizer.ggml.tokens"].contents()
    merges: list[str] = reader.fields["tokenizer.ggml.merges"].contents()
    token_types: list[int] = (
        reader.fields["tokenizer.ggml.token_type"].contents()
        if "tokenizer.ggml.token_type" in reader.fields
        else [1] * len(tokens)
    )
    pre = _field(reader, "tokenizer.ggml.pre", "default")

    # Byte-level vocabularies spell every byte with a printable character;
    # a token using other characters is stored raw and is respelled here.
    alphabet = _byte_alphabet()
    spelled = [t if set(t) <= set(alphabet.values()) else "".join(alphabet[b] for b in t.encode()) for t in tokens]
    backend = BackendTokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(spelled)},
            merges=[(left, right) for left, right in (m.split(" ", 1) for m in merges)],
            ignore_merges=pre == "llama-bpe",
        )
    )
    backend.normalizer, backend.pre_tokenizer = _pre_tokenization(pre)
    backend.decoder = decoders.ByteLevel()
    added = [
        AddedToken(token, special=kind == _CONTROL, normalized=False)
        for token, kind, respelled in zip(tokens, token_types, spelled)
        if kind in (_CONTROL, _USER_DEFINED) and token == respelled
    ]
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    return Tokenizer(
        backend,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(reader),
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def hf_tensor_name(gguf_name: str) -> str:
    """HF parameter name of a GGUF tensor; ValueError for tensors kvos has no place for."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{kind}"


def _unpermute_rotary(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (pair, 2) become (2, half)."""
    rows = weights.shape[0]
    half = rows // num_heads // 2
    grouped = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


def _pre_tokenization(pre: str) -> tuple[normalizers.Normalizer | None, pre_tokenizers.PreTokenizer]:
    """Normalizer and pre-tokenizer matching the HF tokenizer.json of each llama.cpp `pre` family."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "llama-bpe":
        return None, pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), byte_level])
    if pre == "qwen2":
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated")
        return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level])
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp: every digit on its own, then the GPT-2 split.
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in ("default", "gpt2", "gpt-2"):
        return None, gpt2
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: smollm, gpt2, qwen2, llama-bpe")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes that print as themselves keep their character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _eos_ids(reader: gguf.GGUFReader) -> tuple[int, ...]:
    """EOS plus llama.cpp's end-of-turn / end-of-message ids: generation stops at any of them."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return tuple(ids)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()
