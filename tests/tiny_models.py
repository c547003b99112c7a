"""Tiny random HF checkpoints generated with transformers (never downloaded, never in git)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

# Small but not degenerate: 8 heads in 4 query groups (TP up to 4), head_dim 8 (Qwen3: 16, so
# q_dim != hidden), a vocab that needs padding.
BASE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4,
            num_hidden_layers=4, vocab_size=250, max_position_embeddings=64, rms_norm_eps=1e-6)


HYBRID_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")  # gated delta-net + full attention layers


@dataclass(frozen=True)
class TinySpec:
    family: str  # llama, qwen2, qwen3, qwen3_moe, qwen2_moe, mixtral, deepseek_v3, deepseek_v2, glm4_moe, gpt_oss
    tied: bool = False
    num_layers: int = 4
    vocab_size: int = 250
    num_key_value_heads: int = 4
    dtype: torch.dtype = torch.float32
    # DeepSeek families: MTP layers synthesized on disk (transformers creates none), and
    # dense layers before the first MoE layer (first_k_dense_replace).
    mtp_layers: int = 0
    first_dense: int = 1
    mlp_only_layers: tuple[int, ...] = ()  # Qwen3-MoE: dense layers
    # DeepSeek-V3 with every FP8 dimension a multiple of 128 (hidden 256, 4 heads of 64+64,
    # q-LoRA 256, kv-LoRA 128 + rope 64 = 192 rows, like the real 576: not a multiple of 128).
    wide: bool = False
    qk_norm: bool = False  # GLM-4.5 (glm4_moe): use_qk_norm (the published models have none)
    full_attention: tuple[int, ...] = (3,)  # Qwen3-Next / Qwen3.5: full-attention layers (the rest gated delta-net)

    @property
    def key(self) -> str:
        t = "tied" if self.tied else "untied"
        return (f"{self.family}_{t}_L{self.num_layers}_V{self.vocab_size}_G{self.num_key_value_heads}_"
                f"M{self.mtp_layers}_D{self.first_dense}_Q{''.join(map(str, self.mlp_only_layers))}_{str(self.dtype)[6:]}"
                + ("_wide" if self.wide else "") + ("_qknorm" if self.qk_norm else "")
                + (f"_F{''.join(map(str, self.full_attention))}" if self.family in HYBRID_FAMILIES else ""))


def make_config(spec: TinySpec):
    from transformers import (DeepseekV2Config, DeepseekV3Config, LlamaConfig, MixtralConfig, Qwen2Config,
                              Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)

    kw = dict(BASE, num_hidden_layers=spec.num_layers, vocab_size=spec.vocab_size,
              num_key_value_heads=spec.num_key_value_heads, tie_word_embeddings=spec.tied)
    if spec.family == "llama":
        return LlamaConfig(**kw)
    if spec.family == "qwen2":
        return Qwen2Config(**kw)
    if spec.family == "qwen3":
        return Qwen3Config(head_dim=16, **kw)
    if spec.family == "qwen3_moe":  # 4 experts of size 32 on every layer
        return Qwen3MoeConfig(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                              mlp_only_layers=list(spec.mlp_only_layers), **kw)
    if spec.family == "qwen2_moe":  # shared expert (size 64) with a sigmoid gate, dense layers from mlp_only_layers
        return Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                              num_experts_per_tok=2, mlp_only_layers=list(spec.mlp_only_layers), **kw)
    if spec.family == "mixtral":  # Mixtral's intermediate_size is the expert size
        return MixtralConfig(**dict(kw, intermediate_size=32), num_local_experts=4, num_experts_per_tok=2)
    # MLA (8 heads: q_lora 32, kv_lora 16, nope 16, rope 8, v 16), 4 routed experts of size 32,
    # shared experts, dense first layer(s). MHA: num_key_value_heads = heads.
    mla = dict(kw, num_key_value_heads=8, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16, n_routed_experts=4, moe_intermediate_size=32, num_experts_per_tok=2,
               first_k_dense_replace=spec.first_dense)
    if spec.family == "deepseek_v3" and spec.wide:
        wide = dict(kw, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                    kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=4,
                    moe_intermediate_size=256, num_experts_per_tok=2, first_k_dense_replace=spec.first_dense)
        return DeepseekV3Config(**wide, q_lora_rank=256, n_shared_experts=1, n_group=2, topk_group=1,
                                routed_scaling_factor=2.5, norm_topk_prob=True,
                                num_nextn_predict_layers=spec.mtp_layers)
    if spec.family == "deepseek_v3":  # sigmoid router with score-correction bias, 2 expert groups
        return DeepseekV3Config(**mla, q_lora_rank=32, n_shared_experts=1, n_group=2, topk_group=1,
                                routed_scaling_factor=2.5, norm_topk_prob=True,
                                num_nextn_predict_layers=spec.mtp_layers)
    if spec.family == "glm4_moe":  # GQA (head_dim 16) with qkv biases, partial RoPE, DeepSeek-V3's MoE
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(**kw, head_dim=16, attention_bias=True, use_qk_norm=spec.qk_norm,
                             partial_rotary_factor=0.5, n_routed_experts=4, moe_intermediate_size=32,
                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=spec.first_dense,
                             n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                             num_nextn_predict_layers=spec.mtp_layers)
    if spec.family == "deepseek_v32":  # DeepSeek-V3 plus the sparse-attention indexer (4 heads of 16)
        from transformers import DeepseekV32Config

        return DeepseekV32Config(**mla, q_lora_rank=32, n_shared_experts=1, n_group=2, topk_group=1,
                                 routed_scaling_factor=2.5, norm_topk_prob=True, index_n_heads=4,
                                 index_head_dim=16, index_topk=4, num_nextn_predict_layers=spec.mtp_layers)
    if spec.family == "minimax_m2":  # every layer MoE (w1/w3/w2, size 32), full-width q/k norms, router bias
        from transformers import MiniMaxM2Config

        if spec.wide:  # FP8: 4 heads of 128 in 2 groups, experts of 128 (every block whole at TP <= 2)
            return MiniMaxM2Config(**dict(kw, hidden_size=256, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2), head_dim=128, num_local_experts=4,
                                   num_experts_per_tok=2, partial_rotary_factor=0.5)
        return MiniMaxM2Config(**dict(kw, intermediate_size=32), head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, partial_rotary_factor=0.5)
    if spec.family == "gpt_oss":  # 4 experts of 32 (fused, gate/up interleaved), sinks, a 4-token sliding window
        from transformers import GptOssConfig

        # plain RoPE (the published models use YaRN, which no weight depends on)
        return GptOssConfig(**dict(kw, intermediate_size=32), head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                            sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    if spec.family in HYBRID_FAMILIES:
        return _qwen3_next_config(spec, kw)
    if spec.family == "deepseek_v2":  # V2-Lite style: no q-LoRA, softmax greedy routing, 2 shared experts
        return DeepseekV2Config(**mla, q_lora_rank=None, n_shared_experts=2, topk_method="greedy")
    if spec.family in VL_FAMILIES:
        return make_vl_config(spec, kw)
    raise ValueError(spec.family)


def _qwen3_next_config(spec: TinySpec, kw: dict):
    """Qwen3-Next / Qwen3.5: gated delta-net layers (4 key heads of 8, 8 value heads of 16: two value
    heads per key head, dk != dv) except the ``full_attention`` layers (gated attention, head_dim 16);
    MoE families: 4 experts of 32 and a gated shared expert of 64, dense layers from mlp_only_layers."""
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig, Qwen3NextConfig

    layer_types = ["full_attention" if i in spec.full_attention else "linear_attention" for i in range(spec.num_layers)]
    linear = dict(head_dim=16, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=8,
                  linear_value_head_dim=16, linear_conv_kernel_dim=4, layer_types=layer_types)
    moe = dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts_per_tok=2)
    if spec.family == "qwen3_next":
        return Qwen3NextConfig(**kw, **linear, **moe, mlp_only_layers=list(spec.mlp_only_layers))
    if spec.family == "qwen3_5":
        return Qwen3_5TextConfig(**kw, **linear)
    return Qwen3_5MoeTextConfig(**{k: v for k, v in kw.items() if k != "intermediate_size"}, **linear, **moe)


# Vision-language families: the language model above (qwen2 / qwen3 sizes) plus a tiny vision
# tower: 3 blocks of hidden 32 with 4 heads (encoder TP up to 4), MLP 48, 4x4x2 patches of 3
# channels, 2x2 merging; Qwen3-VL: a 16-entry position table and deepstack mergers after blocks 0, 1.
VL_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=BASE["hidden_size"],
              patch_size=4, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)


def make_vl_config(spec: TinySpec, kw: dict):
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    tied = kw.pop("tie_word_embeddings")
    if spec.family == "qwen2_5_vl":  # mrope sections sum to head_dim / 2 = 4
        text = dict(kw, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6})
        vision = dict(VISION, fullatt_block_indexes=[2], window_size=16)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)
    vision = dict(VISION, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    text = dict(kw, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 5e6})
    if spec.family == "qwen3_vl_moe":  # 4 experts of 16 (2 x 16 != hidden, so the stored layout is unambiguous)
        text.update(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                    mlp_only_layers=list(spec.mlp_only_layers))
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)


def publish_stacked_experts(path: str) -> None:
    """Qwen3-VL-MoE's experts as Qwen publishes them, [in, out] per expert (transformers 5 saves
    [out, in] and transposes the published form when it loads)."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    for name in [n for n in tensors if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})


def _copy_layer_with_noise(tensors: dict, layer: str, to: str, gen: torch.Generator, dtype: torch.dtype) -> None:
    """Add a copy of every tensor under prefix ``layer`` under prefix ``to``, each value
    perturbed (an MTP layer with the last decoder layer's shapes but values of its own)."""
    for name, value in list(tensors.items()):
        if name.startswith(layer):
            noise = torch.randn(value.shape, generator=gen).to(dtype) * 0.1
            tensors[to + name[len(layer):]] = (value + noise).contiguous()


def add_mtp_layers(path: str, num_layers: int, mtp_layers: int, seed: int = 1) -> None:
    """Append DeepSeek MTP layers ``model.layers.{num_layers + k}.*`` to a saved tiny model.

    Each is a full decoder layer (random values with the shapes of the last layer) plus enorm,
    hnorm, eh_proj, shared_head.norm, and the copies of the embedding and LM head that real
    DeepSeek checkpoints carry."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(seed)
    last = f"model.layers.{num_layers - 1}."
    hidden = tensors["model.norm.weight"].shape[0]
    dtype = tensors["model.norm.weight"].dtype
    for k in range(mtp_layers):
        head = f"model.layers.{num_layers + k}."
        _copy_layer_with_noise(tensors, last, head, gen, dtype)
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            tensors[f"{head}{norm}.weight"] = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
        tensors[f"{head}eh_proj.weight"] = (0.05 * torch.randn(hidden, 2 * hidden, generator=gen)).to(dtype)
        tensors[f"{head}embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[f"{head}shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, file, metadata={"format": "pt"})


def make_tiny_model(spec: TinySpec, path: str, seed: int = 0) -> str:
    """Save a randomly initialised model (non-trivial norms and biases) to ``path``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if spec.family in VL_FAMILIES else AutoModelForCausalLM
    model = auto.from_config(make_config(spec))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights start at 1 and biases at 0; randomise so every mapping error shows.
            if p.dim() == 1 or name.endswith("_bias"):  # GPT-OSS's expert biases are [experts, out]
                is_scale = "norm" in name
                if spec.family in VL_FAMILIES:  # LayerNorm biases around 0, the merger's ln_q around 1
                    is_scale = ("norm" in name or "ln_q" in name) and not name.endswith(".bias")
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if is_scale else 0.0))
            elif spec.family == "qwen3_vl_moe" and p.dim() == 3:  # stacked experts: defined values
                p.copy_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a buffer, zero at init: make routing see it
                b.copy_(torch.randn_like(b) * 0.1)
    model.to(spec.dtype)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if spec.mtp_layers and spec.family in HYBRID_FAMILIES:
        add_qwen3_next_mtp(path, spec.num_layers)
    elif spec.mtp_layers:
        add_mtp_layers(path, spec.num_layers, spec.mtp_layers)
    if spec.family == "qwen3_vl_moe":
        publish_stacked_experts(path)
    return path


def add_qwen3_next_mtp(path: str, num_layers: int, seed: int = 1) -> None:
    """Qwen3-Next's / Qwen3.5's MTP head on disk (transformers builds none): ``mtp.layers.0.*`` a decoder
    layer with the last (full-attention) layer's shapes, ``mtp.fc`` over [embedding; hidden],
    ``mtp.pre_fc_norm_embedding`` / ``pre_fc_norm_hidden`` / ``norm``; config.json's
    mtp_num_hidden_layers = 1."""
    import json

    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(seed)
    last = f"model.layers.{num_layers - 1}."
    hidden = tensors["model.norm.weight"].shape[0]
    dtype = tensors["model.norm.weight"].dtype
    _copy_layer_with_noise(tensors, last, "mtp.layers.0.", gen, dtype)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        tensors[f"mtp.{norm}.weight"] = (0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    tensors["mtp.fc.weight"] = (0.05 * torch.randn(hidden, 2 * hidden, generator=gen)).to(dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["mtp_num_hidden_layers"] = 1
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)


# DeepSeek-V3's FP8 tensors (formats.md §1): attention and MLP weight matrices, in every layer
# including MTP layers, but not eh_proj, the router, norms, embeddings or the LM head. Written
# independently of the family YAML so the YAML's dtype: fp8 marks are checked against it.
DEEPSEEK_FP8 = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight"
)


# MiniMax-M2's FP8 tensors: the attention and expert weight matrices (not the router, its bias,
# the q/k norms, embeddings or the LM head).
MINIMAX_FP8 = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight")


def make_fp8_checkpoint(bf16_dir: str, path: str, pow2: bool = True, fp8: re.Pattern = DEEPSEEK_FP8) -> str:
    """DeepSeek-style FP8 copy of a bf16 checkpoint, quantized with our ``pt`` quantizer.

    The block scales (``weight_scale_inv``) go to a second shard, away from their weights, as a
    checkpoint may store them anywhere the index says."""
    from convert_checkpoint.quant.fp8_block import Fp8Recipe, quantize_blocks
    from fixtures import load_hf_tensors
    from quantized_fixtures import write_two_shards

    tensors = load_hf_tensors(bf16_dir)
    weights, scales = {}, {}
    for name, value in tensors.items():
        if fp8.fullmatch(name):
            codes, scale = quantize_blocks(value.to(torch.bfloat16), Fp8Recipe(pow2=pow2))
            weights[name], scales[name + "_scale_inv"] = codes, scale
        elif name.endswith("e_score_correction_bias"):
            weights[name] = value.float()  # fp32 in DeepSeek's files
        else:
            weights[name] = value
    config = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
              "weight_block_size": [128, 128], **({"scale_fmt": "ue8m0"} if pow2 else {})}
    return write_two_shards(bf16_dir, path, weights, scales, config)


def dequantize_checkpoint(fp8_dir: str, path: str) -> str:
    """The bf16 checkpoint an FP8 one stands for: ``weight * weight_scale_inv`` per 128-block
    (exact for power-of-two scales), scales and quantization_config dropped."""
    import json
    import shutil

    from safetensors.torch import save_file

    from fixtures import dequantize_fp8_blocks, load_hf_tensors

    os.makedirs(path, exist_ok=True)
    tensors = load_hf_tensors(fp8_dir)
    for name in os.listdir(fp8_dir):
        if not name.endswith(".safetensors") and not name.endswith(".index.json"):
            shutil.copyfile(os.path.join(fp8_dir, name), os.path.join(path, name))
    out = {}
    for name, value in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if value.dtype == torch.float8_e4m3fn:
            value = dequantize_fp8_blocks(value, tensors[name + "_scale_inv"], torch.bfloat16)
        out[name] = value
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path
