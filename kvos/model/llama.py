"""The Llama family (Llama 2/3, SmolLM2, Mistral; Qwen2 via attention_bias).

Parameter names match Hugging Face checkpoints one-to-one, so a state dict
loads with `load_state_dict`. The forward pass runs on a flat batch of tokens
from many requests; only attention needs to know where one request ends.
"""

from __future__ import annotations

import torch
from torch import nn

from kvos.attention.backend import AttentionBackend
from kvos.attention.gather_sdpa import GatherSDPABackend
from kvos.attention.metadata import AttentionMetadata
from kvos.model.arch import ModelArch
from kvos.model.layers import RMSNorm, RotaryEmbedding, RotaryTables, SiluAndMul

# Fused parameter <- the Hugging Face parameters stacked into it, in row order.
FUSED_PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


class LlamaAttention(nn.Module):
    """Self-attention with one fused q|k|v projection: one matmul per layer instead of three."""

    def __init__(self, arch: ModelArch, attention: AttentionBackend) -> None:
        super().__init__()
        self.attention = attention
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            arch.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=arch.attention_bias
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, arch.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTables,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k sit side by side in each row, so one rotary call turns both.
        split = (self.num_heads + self.num_kv_heads) * self.head_dim
        qk = rotary.apply(qkv[:, :split].view(num_tokens, -1, self.head_dim))
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, split:].view(num_tokens, self.num_kv_heads, self.head_dim)
        o = self.attention.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)  # (T, H, D)
        return self.o_proj(o.reshape(num_tokens, -1))


class LlamaMLP(nn.Module):
    """SwiGLU with one fused gate|up projection."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, attention: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, attention)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch)

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTables,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # Sub-layer outputs may come back in a narrower dtype (quantized linears
        # compute in bfloat16); adding them to the residual promotes them back.
        x = x + self.self_attn(self.input_layernorm(x), rotary, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, attention: AttentionBackend) -> None:
        super().__init__()
        # An explicit (uninitialised) weight skips nn.Embedding's random init, whose
        # normal_ on the meta device would import torch._dynamo: a second of start-up.
        self.embed_tokens = nn.Embedding(
            arch.vocab_size, arch.hidden_size, _weight=nn.Parameter(torch.empty(arch.vocab_size, arch.hidden_size))
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, attention) for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """`attention` is the backend every layer calls (default: the gather + SDPA reference)."""

    def __init__(self, arch: ModelArch, max_positions: int, attention: AttentionBackend | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.attention = attention if attention is not None else GatherSDPABackend()
        self.model = LlamaModel(arch, self.attention)
        self.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: (T,) -> final hidden states (T, hidden)."""
        x = self.model.embed_tokens(input_ids)
        rotary = self.rotary.tables(positions)  # gathered once per step, shared by every layer
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, rotary, kv_cache, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Adopt HF-named weights as the parameters; every one must be present, no extras.

        The model is built on the meta device, so adopting the loaded tensors
        is what materialises it: start-up pays for no random init, and copies
        only the projections it fuses (q|k|v and gate|up).
        """
        state_dict = fuse_projections(state_dict)
        expected = {name for name, _ in self.named_parameters()}
        if self.arch.tie_word_embeddings:
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
            expected.discard("lm_head.weight")
        missing = sorted(expected - state_dict.keys())
        unexpected = sorted(k for k in state_dict.keys() - expected if not k.endswith("rotary_emb.inv_freq"))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict({k: state_dict[k] for k in expected}, strict=False, assign=True)
        self._tie_embeddings()

    def _tie_embeddings(self) -> None:
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_dummy_weights(self, device: torch.device, seed: int) -> None:
        """Random weights with a realistic scale, for benchmarking shapes without a checkpoint."""
        # Materialise the parameters only: `to_empty` would also wipe the rotary tables.
        for module in self.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(torch.empty_like(param, device=device), requires_grad=False))
        self._tie_embeddings()
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)


def fuse_projections(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack HF's separate q/k/v and gate/up weights (and biases) into kvos's fused ones.

    Names that are already fused, or that have nothing to fuse, pass through;
    a fused projection with some parts missing is left out, so `load_weights`
    names it as missing.
    """
    fused = dict(state_dict)
    for name in state_dict:
        for target, parts in FUSED_PROJECTIONS.items():
            marker = "." + parts[0] + "."
            if marker not in name:
                continue
            prefix, suffix = name.split(marker)
            names = [f"{prefix}.{part}.{suffix}" for part in parts]
            if all(n in state_dict for n in names):
                fused[f"{prefix}.{target}.{suffix}"] = torch.cat([state_dict[n] for n in names])
                for n in names:
                    del fused[n]
    return fused
