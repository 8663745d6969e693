"""The shape of a decoder-only transformer, in Hugging Face's vocabulary.

Every source (an HF folder, a GGUF file, a bare config.json for dummy weights)
is reduced to this one record, so the model code never needs to know where
its weights came from. GGUF metadata is first rewritten as an HF config dict
(see `gguf_loader`), which keeps a single parser here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# model_type -> the HF class names that carry it in `architectures`.
SUPPORTED_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "llama": ("LlamaForCausalLM",),
    "mistral": ("MistralForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
}


@dataclass(frozen=True)
class ModelArch:
    """Hyper-parameters of a Llama-family model (Llama, Mistral, Qwen2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Attention looks back at most this many tokens (Mistral 7B v0.1); None = full context.
    sliding_window: int | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArch:
        """Parse a `config.json` dict.

        Accepts both the transformers v4 spelling (`rope_theta`, `rope_scaling`)
        and the v5 one (`rope_parameters`), since folders of either age exist.
        """
        model_type = _model_type(cfg)
        hidden_size = int(_require(cfg, "hidden_size"))
        num_heads = int(_require(cfg, "num_attention_heads"))
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        head_dim = int(cfg.get("head_dim") or hidden_size // num_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        rope_theta, rope_scaling = _rope(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(i) for i in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        bos = cfg.get("bos_token_id")
        return cls(
            architecture=model_type,
            vocab_size=int(_require(cfg, "vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(_require(cfg, "intermediate_size")),
            num_hidden_layers=int(_require(cfg, "num_hidden_layers")),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; its config has no switch for them.
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            sliding_window=_sliding_window(cfg, model_type),
        )


def _model_type(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    architectures = cfg.get("architectures") or []
    if model_type is None:
        for name, classes in SUPPORTED_MODEL_TYPES.items():
            if any(a in classes for a in architectures):
                return name
        raise ValueError(f"config has no model_type and unsupported architectures {architectures!r}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r} (architectures {architectures!r}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    unknown = [a for a in architectures if a not in SUPPORTED_MODEL_TYPES[model_type]]
    if unknown:
        raise ValueError(f"unsupported architectures {unknown!r} for model_type {model_type!r}")
    return model_type


def _sliding_window(cfg: dict[str, Any], model_type: str) -> int | None:
    window = cfg.get("sliding_window")
    if window is None or (model_type == "qwen2" and not cfg.get("use_sliding_window", False)):
        return None
    return int(window)


def _require(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"config is missing {key!r}")
    return cfg[key]


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either `rope_theta`/`rope_scaling` or `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or params)
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("rope_theta", None)
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling
