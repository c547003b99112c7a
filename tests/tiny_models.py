"""Tiny random HF checkpoints generated with transformers (never downloaded, never in git)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Small but not degenerate: 8 heads in 4 query groups (TP up to 4), head_dim 8 (Qwen3: 16, so
# q_dim != hidden), a vocab that needs padding.
BASE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4,
            num_hidden_layers=4, vocab_size=250, max_position_embeddings=64, rms_norm_eps=1e-6)


@dataclass(frozen=True)
class TinySpec:
    family: str  # llama, qwen2, qwen3, qwen3_moe, mixtral
    tied: bool = False
    num_layers: int = 4
    vocab_size: int = 250
    num_key_value_heads: int = 4
    dtype: torch.dtype = torch.float32

    @property
    def key(self) -> str:
        t = "tied" if self.tied else "untied"
        return f"{self.family}_{t}_L{self.num_layers}_V{self.vocab_size}_G{self.num_key_value_heads}_{str(self.dtype)[6:]}"


def make_config(spec: TinySpec):
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    kw = dict(BASE, num_hidden_layers=spec.num_layers, vocab_size=spec.vocab_size,
              num_key_value_heads=spec.num_key_value_heads, tie_word_embeddings=spec.tied)
    if spec.family == "llama":
        return LlamaConfig(**kw)
    if spec.family == "qwen2":
        return Qwen2Config(**kw)
    if spec.family == "qwen3":
        return Qwen3Config(head_dim=16, **kw)
    if spec.family == "qwen3_moe":  # 4 experts of size 32 on every layer
        return Qwen3MoeConfig(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, **kw)
    if spec.family == "mixtral":  # Mixtral's intermediate_size is the expert size
        return MixtralConfig(**dict(kw, intermediate_size=32), num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(spec.family)


def make_tiny_model(spec: TinySpec, path: str, seed: int = 0) -> str:
    """Save a randomly initialised model (non-trivial norms and biases) to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(spec))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights start at 1 and biases at 0; randomise so every mapping error shows.
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.to(spec.dtype)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path
