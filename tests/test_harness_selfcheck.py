"""Self-check of tests/mcore_harness.py, independent of the converter.

Tiny random transformers models are turned into Megatron-Core legacy checkpoints by a
hand-written reference writer (HF->MCore mapping of env.md §2.3, and a DeepSeek MLA / MoE /
MTP mapping); the harness must accept them (strict load + logits and MTP logits within 1e-4)
and must reject deliberately broken copies.
Everything that needs megatron runs in ONE run_checks call (one spawn of 4 workers).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from mcore_harness import (
    MLA_TE_KEYS_MAP,
    CheckJob,
    Layout,
    assert_all_ok,
    job_problems,
    rank_dir_name,
    read_hf_arch,
    rename_grouped_experts_to_local,
    rename_te_to_local,
    run_checks,
    split_duplicated_to_tp,
)
from tiny_models import TinySpec, make_config

WORLD_SIZE = 4
VOCAB_DIVISIBLE_BY = 128  # megatron-LM's default make_vocab_size_divisible_by


# --------------------------------------------------------------------------------------
# Tiny HF models
# --------------------------------------------------------------------------------------


def _save_tiny_model(
    out: Path, model_type: str, num_layers: int, tied: bool = False, rope_theta: float = 10000.0
) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=num_layers,
        vocab_size=100,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    if model_type == "llama":
        config = LlamaConfig(**common)
    elif model_type == "qwen2":
        config = Qwen2Config(**common)
    else:
        # head_dim 32 != hidden/heads: catches code that assumes hidden == heads*head_dim.
        config = Qwen3Config(**common, head_dim=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random norms and biases too (HF initializes them to 1 / 0), so that swapped or
    # dropped norms change the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------
# Reference HF -> MCore legacy writer (deliberately independent of the converter)
# --------------------------------------------------------------------------------------


def _padded_vocab(vocab: int, tp: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tp
    return -(-vocab // multiple) * multiple


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def _qkv_shard(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, tp: int, rank: int
) -> torch.Tensor:
    """MCore fused QKV: per query group [its q heads; k; v], groups split over TP."""
    trailing = q.shape[1:]  # (hidden,) for weights, () for biases
    fused = torch.cat([t.reshape(groups, -1, *trailing) for t in (q, k, v)], dim=1)
    return fused.chunk(tp, dim=0)[rank].reshape(-1, *trailing).clone()


def _layer_state(
    hf: dict[str, torch.Tensor], arch: Any, layer: int, tp: int, rank: int, te: bool
) -> dict[str, Any]:
    src = f"model.layers.{layer}."
    attn = src + "self_attn."
    groups = arch.num_kv_heads
    out: dict[str, Any] = {
        "self_attention.linear_qkv.weight": _qkv_shard(
            *(hf[attn + f"{name}_proj.weight"] for name in "qkv"), groups, tp, rank
        ),
        "self_attention.linear_qkv._extra_state": None,
        "self_attention.linear_proj.weight": hf[attn + "o_proj.weight"].chunk(tp, dim=1)[rank].clone(),
        "self_attention.linear_proj._extra_state": None,
        "mlp.linear_fc1.weight": torch.cat(
            [hf[src + "mlp.gate_proj.weight"].chunk(tp)[rank], hf[src + "mlp.up_proj.weight"].chunk(tp)[rank]]
        ),
        "mlp.linear_fc1._extra_state": None,
        "mlp.linear_fc2.weight": hf[src + "mlp.down_proj.weight"].chunk(tp, dim=1)[rank].clone(),
        "mlp.linear_fc2._extra_state": None,
    }
    if arch.qkv_bias:
        out["self_attention.linear_qkv.bias"] = _qkv_shard(
            *(hf[attn + f"{name}_proj.bias"] for name in "qkv"), groups, tp, rank
        )
    if arch.qk_norm:
        out["self_attention.q_layernorm.weight"] = hf[attn + "q_norm.weight"].clone()
        out["self_attention.k_layernorm.weight"] = hf[attn + "k_norm.weight"].clone()
    if te:
        # TE spec: the norms are fused into the following linear; TE attention has state.
        out["self_attention.linear_qkv.layer_norm_weight"] = hf[src + "input_layernorm.weight"].clone()
        out["mlp.linear_fc1.layer_norm_weight"] = hf[src + "post_attention_layernorm.weight"].clone()
        out["self_attention.core_attention._extra_state"] = None
    else:
        out["input_layernorm.weight"] = hf[src + "input_layernorm.weight"].clone()
        out["pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"].clone()
    return out



def _save_rank_file(rank_dir: Path, chunks: list[dict[str, Any]], args: Any) -> None:
    """A legacy rank file as Megatron writes it: ``model`` or ``model0..`` (VPP) plus args."""
    ckpt: dict[str, Any] = {"checkpoint_version": 3.0, "iteration": 0, "args": args}
    if len(chunks) == 1:
        ckpt["model"] = chunks[0]
    else:
        ckpt.update({f"model{i}": sd for i, sd in enumerate(chunks)})
    rank_dir.mkdir(parents=True)
    torch.save(ckpt, rank_dir / "model_optim_rng.pt")


def write_reference_checkpoint(
    hf_dir: Path,
    out: Path,
    layout: Layout,
    tied: bool,
    te: bool = False,
    extra_state: bool = True,
    vstage_of: Callable[[int, int], int] | None = None,
) -> Path:
    """Write ``out`` as our converter should; ``extra_state=False`` omits the ``_extra_state``
    entries, ``vstage_of(pp_rank, chunk)`` overrides the interleaved chunk -> stage rule."""
    vstage_of = vstage_of or layout.vstage
    hf = load_file(str(hf_dir / "model.safetensors"))
    arch = read_hf_arch(hf_dir)
    tp, pp = layout.tp, layout.pp
    padded = _padded_vocab(arch.vocab_size, tp)
    embedding = _pad_rows(hf["model.embed_tokens.weight"], padded)
    output = _pad_rows(hf["model.embed_tokens.weight" if tied else "lm_head.weight"], padded)
    args = argparse.Namespace(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_layers=arch.num_layers,
        padded_vocab_size=padded,
        make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY,
        untie_embeddings_and_output_weights=not tied,
    )
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            chunks = []
            for chunk in range(layout.vpp):
                vstage = vstage_of(pp_rank, chunk)
                sd: dict[str, Any] = {}
                if vstage == 0:
                    sd["embedding.word_embeddings.weight"] = embedding.chunk(tp)[tp_rank].clone()
                offset = layout.layer_offset(vstage)
                for local in range(layout.layers_per_vstage[vstage]):
                    for key, value in _layer_state(hf, arch, offset + local, tp, tp_rank, te).items():
                        sd[f"decoder.layers.{local}.{key}"] = value
                if vstage == layout.num_vstages - 1:
                    sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
                    # Tied with one stage: the output layer reuses the embedding, no weight.
                    if not (tied and layout.num_vstages == 1):
                        sd["output_layer.weight"] = output.chunk(tp)[tp_rank].clone()
                    sd["output_layer._extra_state"] = None
                if not extra_state:
                    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
                chunks.append(sd)
            _save_rank_file(out / "release" / rank_dir_name(tp_rank, pp_rank, pp), chunks, args)
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    return out


def _mla_layer_state(
    hf: dict[str, torch.Tensor],
    arch: Any,
    src: str,
    moe: bool,
    layout: Layout,
    tp_rank: int,
    ep_rank: int,
    te: bool,
) -> dict[str, Any]:
    """One DeepSeek decoder layer (HF prefix ``src``) as megatron's MLA layer of one rank."""
    tp = layout.tp
    attn = src + "self_attn."

    def split(weight: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return weight.chunk(tp, dim=dim)[tp_rank].clone()

    # Local spec: ColumnParallelLinear down projections (row-split); TE: duplicated, full.
    down = (lambda w: w.clone()) if te else split
    out: dict[str, Any] = {"input_layernorm.weight": hf[src + "input_layernorm.weight"].clone()}
    linears = ["linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"]
    if arch.q_lora_rank:
        linears += ["linear_q_down_proj", "linear_q_up_proj"]
        out["self_attention.linear_q_down_proj.weight"] = down(hf[attn + "q_a_proj.weight"])
        q_norm = "linear_q_up_proj.layer_norm_weight" if te else "q_layernorm.weight"
        out["self_attention." + q_norm] = hf[attn + "q_a_layernorm.weight"].clone()
        out["self_attention.linear_q_up_proj.weight"] = split(hf[attn + "q_b_proj.weight"])
    else:
        linears.append("linear_q_proj")
        out["self_attention.linear_q_proj.weight"] = split(hf[attn + "q_proj.weight"])
    out["self_attention.linear_kv_down_proj.weight"] = down(hf[attn + "kv_a_proj_with_mqa.weight"])
    kv_norm = "linear_kv_up_proj.layer_norm_weight" if te else "kv_layernorm.weight"
    out["self_attention." + kv_norm] = hf[attn + "kv_a_layernorm.weight"].clone()
    out["self_attention.linear_kv_up_proj.weight"] = split(hf[attn + "kv_b_proj.weight"])
    out["self_attention.linear_proj.weight"] = split(hf[attn + "o_proj.weight"], dim=1)
    out.update({f"self_attention.{name}._extra_state": None for name in linears})
    if te:
        out["self_attention.core_attention._extra_state"] = None

    def fc1_fc2(prefix: str, dest: str, parts: int, rank: int) -> None:
        gate, up = (hf[prefix + f"{name}_proj.weight"].chunk(parts)[rank] for name in ("gate", "up"))
        out[dest + "linear_fc1.weight"] = torch.cat([gate, up])
        out[dest + "linear_fc2.weight"] = hf[prefix + "down_proj.weight"].chunk(parts, dim=1)[rank].clone()
        out[dest + "linear_fc1._extra_state"] = None
        out[dest + "linear_fc2._extra_state"] = None

    post_norm = hf[src + "post_attention_layernorm.weight"].clone()
    if not moe:
        out["mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"] = post_norm
        fc1_fc2(src + "mlp.", "mlp.", tp, tp_rank)
        return out
    out["pre_mlp_layernorm.weight"] = post_norm
    out["mlp.router.weight"] = hf[src + "mlp.gate.weight"].clone()
    if arch.moe_expert_bias:
        out["mlp.router.expert_bias"] = hf[src + "mlp.gate.e_score_correction_bias"].float().clone()
    per_rank = arch.num_experts // layout.ep
    for local in range(per_rank):
        expert = ep_rank * per_rank + local
        # ETP = TP here, so the expert TP rank is the TP rank.
        fc1_fc2(f"{src}mlp.experts.{expert}.", f"mlp.experts.local_experts.{local}.", layout.expert_tp, tp_rank)
    if arch.shared_expert_ffn_hidden_size:
        fc1_fc2(src + "mlp.shared_experts.", "mlp.shared_experts.", tp, tp_rank)
    return out


def write_reference_mla_checkpoint(hf_dir: Path, out: Path, layout: Layout, te: bool = False) -> Path:
    """DeepSeek-V2/V3 (MLA, MoE + shared experts, dense first layers, MTP) written by hand as
    megatron-core 0.16 lays it out, for ETP = TP."""
    if layout.expert_tp != layout.tp:
        raise ValueError("the reference MLA writer assumes ETP = TP")
    hf = load_file(str(hf_dir / "model.safetensors"))
    arch = read_hf_arch(hf_dir)
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    padded = _padded_vocab(arch.vocab_size, tp)
    embedding = _pad_rows(hf["model.embed_tokens.weight"], padded)
    output = _pad_rows(hf["lm_head.weight"], padded)
    args = argparse.Namespace(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=layout.expert_tp,
        num_layers=arch.num_layers,
        padded_vocab_size=padded,
        num_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_grouped_gemm=False,
        multi_latent_attention=True,
        q_lora_rank=arch.q_lora_rank,
        kv_lora_rank=arch.kv_lora_rank,
        qk_head_dim=arch.qk_nope_head_dim,
        qk_pos_emb_head_dim=arch.qk_rope_head_dim,
        v_head_dim=arch.v_head_dim,
        mtp_num_layers=arch.mtp_layers or None,
        moe_layer_freq=list(arch.moe_layers),
    )
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            for ep_rank in range(ep):
                chunks = []
                for chunk in range(layout.vpp):
                    vstage = layout.vstage(pp_rank, chunk)
                    last = vstage == layout.num_vstages - 1
                    sd: dict[str, Any] = {}
                    # The MTP stage needs the embedding as well (its own copy under PP).
                    if vstage == 0 or (last and arch.mtp_layers):
                        sd["embedding.word_embeddings.weight"] = embedding.chunk(tp)[tp_rank].clone()
                    offset = layout.layer_offset(vstage)
                    for local in range(layout.layers_per_vstage[vstage]):
                        layer = offset + local
                        moe = bool(arch.moe_layers[layer])
                        state = _mla_layer_state(
                            hf, arch, f"model.layers.{layer}.", moe, layout, tp_rank, ep_rank, te
                        )
                        sd.update({f"decoder.layers.{local}.{key}": value for key, value in state.items()})
                    if last:
                        sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
                        sd["output_layer.weight"] = output.chunk(tp)[tp_rank].clone()
                        sd["output_layer._extra_state"] = None
                        for k in range(arch.mtp_layers):
                            src, dst = f"model.layers.{arch.num_layers + k}.", f"mtp.layers.{k}."
                            sd[dst + "enorm.weight"] = hf[src + "enorm.weight"].clone()
                            sd[dst + "hnorm.weight"] = hf[src + "hnorm.weight"].clone()
                            sd[dst + "eh_proj.weight"] = hf[src + "eh_proj.weight"].chunk(tp)[tp_rank].clone()
                            sd[dst + "eh_proj._extra_state"] = None
                            state = _mla_layer_state(hf, arch, src, True, layout, tp_rank, ep_rank, te)
                            sd.update({f"{dst}transformer_layer.{key}": value for key, value in state.items()})
                            sd[dst + "final_layernorm.weight"] = hf[src + "shared_head.norm.weight"].clone()
                    chunks.append(sd)
                _save_rank_file(out / "release" / rank_dir_name(tp_rank, pp_rank, pp, ep_rank, ep), chunks, args)
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    return out


def _rank_file(ckpt: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    return ckpt / "release" / rank_dir_name(tp_rank, pp_rank, pp) / "model_optim_rng.pt"


def _edit_rank_file(path: Path, edit: Any) -> None:
    torch.serialization.add_safe_globals([argparse.Namespace])
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    edit(ckpt["model"])
    torch.save(ckpt, path)


# --------------------------------------------------------------------------------------
# Cheap tests (no spawn)
# --------------------------------------------------------------------------------------


def test_layout_validation() -> None:
    assert Layout(2, 3, 1, [2, 2, 1]).layers_per_vstage == (2, 2, 1)
    assert Layout.even(1, 2, 8, vpp=2).layers_per_vstage == (2, 2, 2, 2)
    lay = Layout(1, 2, 2, (1, 2, 1, 1))
    # chunk s of pp rank p is virtual stage p + s*pp
    assert [lay.vstage(1, 0), lay.vstage(0, 1)] == [1, 2]
    assert [lay.layer_offset(v) for v in range(4)] == [0, 1, 3, 4]
    with pytest.raises(ValueError):
        Layout(1, 2, 1, (4,))
    with pytest.raises(ValueError):
        Layout(1, 1, 2, (2, 2))
    # ETP defaults to TP (megatron's default); world size must fit tp*pp and etp*ep*pp.
    moe = Layout(2, 2, 1, (2, 2), ep=2)
    assert moe.etp == 2 and moe.world_size_problem(8) is None
    assert "etp*ep*pp=8" in (moe.world_size_problem(4) or "")
    assert Layout(2, 1, 1, (4,), ep=4, etp=1).world_size_problem(4) is None
    assert "tp*pp=4" in (Layout(4, 1, 1, (4,), ep=2, etp=1).world_size_problem(2) or "")


def test_rank_dir_name() -> None:
    assert rank_dir_name(1, 0, 1) == "mp_rank_01"
    assert rank_dir_name(0, 2, 3) == "mp_rank_00_002"
    assert rank_dir_name(1, 0, 1, ep_rank=3, ep=4) == "mp_rank_01_003"
    assert rank_dir_name(1, 1, 2, ep_rank=0, ep=2) == "mp_rank_01_001_000"


def test_rename_te_to_local() -> None:
    keys_map = {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }
    renamed = rename_te_to_local(
        {
            "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight": 1,
            "decoder.layers.3.self_attention.linear_qkv.weight": 2,
            "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 3,
            "decoder.final_layernorm.weight": 4,
        },
        keys_map,
    )
    assert renamed == {
        "decoder.layers.3.input_layernorm.weight": 1,
        "decoder.layers.3.self_attention.linear_qkv.weight": 2,
        "decoder.layers.0.pre_mlp_layernorm.weight": 3,
        "decoder.final_layernorm.weight": 4,
    }
    with pytest.raises(KeyError, match="local-style key"):
        rename_te_to_local({"decoder.layers.0.input_layernorm.weight": 1}, keys_map)
    # Per-layer maps: an MoE layer (1) keeps pre_mlp_layernorm under TE.
    moe_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    assert rename_te_to_local(
        {
            "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 1,
            "decoder.layers.1.pre_mlp_layernorm.weight": 2,
            "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight": 3,
        },
        keys_map,
        {0: keys_map, 1: moe_map},
    ) == {
        "decoder.layers.0.pre_mlp_layernorm.weight": 1,
        "decoder.layers.1.pre_mlp_layernorm.weight": 2,
        "decoder.layers.1.input_layernorm.weight": 3,
    }


def test_rename_grouped_experts_to_local() -> None:
    experts = "decoder.layers.2.mlp.experts."
    renamed = rename_grouped_experts_to_local(
        {
            experts + "linear_fc1.weight0": 1,
            experts + "linear_fc1.weight1": 2,
            experts + "linear_fc2.weight10": 3,
            experts + "linear_fc1._extra_state": None,
            experts + "linear_fc2._extra_state": None,
            "decoder.layers.2.mlp.router.weight": 4,
        }
    )
    assert renamed == {
        experts + "local_experts.0.linear_fc1.weight": 1,
        experts + "local_experts.1.linear_fc1.weight": 2,
        experts + "local_experts.10.linear_fc2.weight": 3,
        "decoder.layers.2.mlp.router.weight": 4,
    }
    with pytest.raises(KeyError, match="SequentialMLP-style expert key"):
        rename_grouped_experts_to_local({experts + "local_experts.0.linear_fc1.weight": 1})


def test_rename_grouped_experts_in_mtp_layers() -> None:
    prefix = "mtp.layers.0.transformer_layer.mlp.experts."
    assert rename_grouped_experts_to_local(
        {prefix + "linear_fc1.weight1": 1, prefix + "linear_fc2._extra_state": None}
    ) == {prefix + "local_experts.1.linear_fc1.weight": 1}


def test_rename_te_to_local_mla_and_mtp() -> None:
    mtp = "mtp.layers.0.transformer_layer."
    dense_map = dict(MLA_TE_KEYS_MAP)
    moe_map = {k: v for k, v in MLA_TE_KEYS_MAP.items() if k != "pre_mlp_layernorm."}
    renamed = rename_te_to_local(
        {
            "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight": 1,
            "decoder.layers.0.self_attention.linear_kv_up_proj.layer_norm_weight": 2,
            "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 3,
            "decoder.layers.0.input_layernorm.weight": 4,
            "decoder.layers.1.pre_mlp_layernorm.weight": 5,
            mtp + "self_attention.linear_kv_up_proj.layer_norm_weight": 6,
            mtp + "pre_mlp_layernorm.weight": 7,
            "mtp.layers.0.enorm.weight": 8,
        },
        {},
        {0: dense_map, 1: moe_map, mtp: moe_map},
    )
    assert renamed == {
        "decoder.layers.0.self_attention.q_layernorm.weight": 1,
        "decoder.layers.0.self_attention.kv_layernorm.weight": 2,
        "decoder.layers.0.pre_mlp_layernorm.weight": 3,
        "decoder.layers.0.input_layernorm.weight": 4,
        "decoder.layers.1.pre_mlp_layernorm.weight": 5,
        mtp + "self_attention.kv_layernorm.weight": 6,
        mtp + "pre_mlp_layernorm.weight": 7,
        "mtp.layers.0.enorm.weight": 8,
    }
    with pytest.raises(KeyError, match="local-style key"):
        rename_te_to_local({mtp + "self_attention.kv_layernorm.weight": 1}, {}, {mtp: moe_map})


def test_split_duplicated_to_tp() -> None:
    full = torch.arange(24.0).reshape(6, 4)
    sd = {
        "decoder.layers.0.self_attention.linear_kv_down_proj.weight": full,
        "mtp.layers.0.transformer_layer.self_attention.linear_q_down_proj.weight": full,
        "decoder.layers.0.self_attention.linear_kv_up_proj.weight": full,
    }
    sliced, copies = split_duplicated_to_tp(sd, tp=2, tp_rank=1)
    mtp_q_down = "mtp.layers.0.transformer_layer.self_attention.linear_q_down_proj.weight"
    assert torch.equal(sliced["decoder.layers.0.self_attention.linear_kv_down_proj.weight"], full[3:])
    assert torch.equal(sliced[mtp_q_down], full[3:])
    assert sliced["decoder.layers.0.self_attention.linear_kv_up_proj.weight"] is full  # not a down projection
    assert sorted(copies) == sorted(k for k in sd if "down_proj" in k)
    assert split_duplicated_to_tp(sd, tp=1, tp_rank=0) == (sd, {})
    with pytest.raises(KeyError, match="do not split over TP=4"):
        split_duplicated_to_tp(sd, tp=4, tp_rank=0)


def test_read_hf_arch_deepseek(tmp_path: Path) -> None:
    make_config(TinySpec("deepseek_v3", mtp_layers=1)).save_pretrained(tmp_path / "v3")
    make_config(TinySpec("deepseek_v2")).save_pretrained(tmp_path / "v2")
    v3, v2 = read_hf_arch(tmp_path / "v3"), read_hf_arch(tmp_path / "v2")
    assert (v3.mla, v3.q_lora_rank, v3.kv_lora_rank) == (True, 32, 16)
    assert (v3.qk_nope_head_dim, v3.qk_rope_head_dim, v3.v_head_dim) == (16, 8, 16)
    assert v3.moe_layers == (0, 1, 1, 1) and v3.shared_expert_ffn_hidden_size == 32 and v3.mtp_layers == 1
    assert (v3.moe_score_function, v3.moe_expert_bias, v3.moe_renormalize, v3.moe_scaling_factor) == (
        "sigmoid", True, True, 2.5)
    assert (v3.moe_num_groups, v3.moe_group_topk, v3.moe_group_score_topn) == (2, 1, 2)
    assert v3.rope_interleave
    assert (v2.q_lora_rank, v2.shared_expert_ffn_hidden_size, v2.moe_score_function, v2.moe_renormalize) == (
        None, 64, "softmax", False)
    assert (v2.moe_expert_bias, v2.moe_num_groups, v2.mtp_layers, v2.rope_interleave) == (False, None, 0, True)


def test_read_hf_arch_qwen_moe(tmp_path: Path) -> None:
    make_config(TinySpec("qwen2_moe", mlp_only_layers=(1,))).save_pretrained(tmp_path / "q2")
    q2 = read_hf_arch(tmp_path / "q2")
    assert (q2.num_experts, q2.moe_ffn_hidden_size, q2.moe_topk, q2.moe_renormalize) == (4, 32, 2, False)
    assert q2.moe_layers == (1, 0, 1, 1)
    assert (q2.shared_expert_ffn_hidden_size, q2.moe_shared_expert_gate) == (64, True)
    assert q2.qkv_bias and not q2.qk_norm and q2.ffn_hidden_size == 128
    config_path = tmp_path / "q2" / "config.json"
    config = json.loads(config_path.read_text())
    # transformers < 5 configs have no qkv_bias field: Qwen2-MoE then always has the biases.
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "qkv_bias"}))
    assert read_hf_arch(tmp_path / "q2").qkv_bias
    variant_config = {**config, "qkv_bias": False, "mlp_only_layers": [], "decoder_sparse_step": 2}
    config_path.write_text(json.dumps(variant_config))
    variant = read_hf_arch(tmp_path / "q2")
    assert not variant.qkv_bias and variant.moe_layers == (0, 1, 0, 1)
    config_path.write_text(json.dumps({**config, "use_sliding_window": True}))
    with pytest.raises(ValueError, match="sliding"):
        read_hf_arch(tmp_path / "q2")

    make_config(TinySpec("qwen3_moe", mlp_only_layers=(0, 2))).save_pretrained(tmp_path / "q3")
    q3 = read_hf_arch(tmp_path / "q3")
    assert q3.moe_layers == (0, 1, 0, 1)
    assert (q3.shared_expert_ffn_hidden_size, q3.moe_shared_expert_gate) == (0, False)
    assert q3.qk_norm and not q3.qkv_bias


# --------------------------------------------------------------------------------------
# The one spawn: positive and negative jobs together
# --------------------------------------------------------------------------------------


def test_harness_accepts_reference_and_rejects_corruptions(
    tmp_path: Path, tiny_hf: Callable[[TinySpec], str]
) -> None:
    llama = _save_tiny_model(tmp_path / "hf_llama", "llama", num_layers=5)
    qwen3 = _save_tiny_model(tmp_path / "hf_qwen3", "qwen3", num_layers=3, tied=True)
    qwen2 = _save_tiny_model(tmp_path / "hf_qwen2", "qwen2", num_layers=2, rope_theta=1e6)

    tp2pp2 = Layout(2, 2, 1, (3, 2))  # uneven
    vpp = Layout(1, 2, 2, (1, 2, 1, 1))  # interleaved + uneven; dp=2 replicas

    def reference(name: str, hf: Path, layout: Layout, **kwargs: Any) -> Path:
        return write_reference_checkpoint(hf, tmp_path / name, layout, **{"tied": False, **kwargs})

    good = reference("llama_tp2pp2", llama, tp2pp2)
    positive = [
        CheckJob(str(llama), str(good), tp2pp2, check_logits=True),
        CheckJob(str(llama), str(reference("llama_vpp", llama, vpp)), vpp, check_logits=True),
        CheckJob(str(llama), str(reference("llama_te", llama, tp2pp2, te=True)), tp2pp2,
                 te_names=True, check_logits=True),
        CheckJob(str(qwen3), str(reference("qwen3_tied", qwen3, Layout(2, 2, 1, (2, 1)), tied=True)),
                 Layout(2, 2, 1, (2, 1)), tied=True, check_logits=True),
        # qkv bias, rope theta 1e6, and no _extra_state entries at all.
        CheckJob(str(qwen2), str(reference("qwen2_tp2", qwen2, Layout.even(2, 1, 2), extra_state=False)),
                 Layout.even(2, 1, 2), check_logits=True),
    ]
    # DeepSeek (MLA, dense layer 0, shared experts, router bias and groups, MTP).
    dsv3, dsv2 = Path(tiny_hf(TinySpec("deepseek_v3", mtp_layers=1))), Path(tiny_hf(TinySpec("deepseek_v2")))
    tp2ep2, tp2pp2_even = Layout(2, 1, 1, (4,), ep=2), Layout(2, 2, 1, (2, 2))
    v3_local = write_reference_mla_checkpoint(dsv3, tmp_path / "v3_tp2ep2", tp2ep2)
    v3_te = write_reference_mla_checkpoint(dsv3, tmp_path / "v3_te_tp2pp2", tp2pp2_even, te=True)
    positive += [
        CheckJob(str(dsv3), str(v3_local), tp2ep2, check_logits=True),
        # TE names with the MTP layer (and its embedding copy) on pp rank 1.
        CheckJob(str(dsv3), str(v3_te), tp2pp2_even, te_names=True, check_logits=True),
        CheckJob(str(dsv2), str(write_reference_mla_checkpoint(dsv2, tmp_path / "v2_te", tp2ep2, te=True)),
                 tp2ep2, te_names=True, check_logits=True),
    ]

    # Negative 1: a key deleted from one rank file.
    missing = Path(shutil.copytree(good, tmp_path / "neg_missing"))
    _edit_rank_file(_rank_file(missing, 1, 1, 2), lambda sd: sd.pop("decoder.layers.1.mlp.linear_fc2.weight"))
    # Negative 2: two TP ranks' files swapped: same keys and shapes, only logits can tell.
    swapped = Path(shutil.copytree(good, tmp_path / "neg_swapped"))
    a, b = _rank_file(swapped, 0, 0, 2), _rank_file(swapped, 1, 0, 2)
    a.rename(a.with_suffix(".swap"))
    b.rename(a)
    a.with_suffix(".swap").rename(b)
    # Negative 3: an unexpected key and a wrong shape in one file.
    shapes = Path(shutil.copytree(good, tmp_path / "neg_shapes"))

    def corrupt(sd: dict[str, Any]) -> None:
        sd["decoder.layers.0.self_attention.bogus.weight"] = torch.zeros(1)
        sd["decoder.layers.0.mlp.linear_fc2.weight"] = torch.zeros(64, 128)

    _edit_rank_file(_rank_file(shapes, 0, 0, 2), corrupt)
    # Negative 4: a stray rank directory that no megatron rank would open.
    stray = Path(shutil.copytree(good, tmp_path / "neg_stray"))
    shutil.copytree(stray / "release" / "mp_rank_00_001", stray / "release" / "mp_rank_00_002")
    negative = [
        CheckJob(str(llama), str(missing), tp2pp2),
        CheckJob(str(llama), str(swapped), tp2pp2, check_logits=True),
        CheckJob(str(llama), str(shapes), tp2pp2),
        CheckJob(str(llama), str(stray), tp2pp2),
        # Negative 5: the right files read with the wrong stage split.
        CheckJob(str(llama), str(good), Layout(2, 2, 1, (2, 3))),
        # Negative 6: TE names in a file read as local names.
        CheckJob(str(llama), str(tmp_path / "llama_te"), tp2pp2),
        # Negative 7: VPP chunks assigned contiguously (stage p*vpp+s) instead of
        # interleaved; with (1,1,1,2) the key sets agree and only the logits differ.
        CheckJob(str(llama), str(reference("neg_vpp_order", llama, Layout(1, 2, 2, (1, 1, 1, 2)),
                                           vstage_of=lambda p, s: p * 2 + s)),
                 Layout(1, 2, 2, (1, 1, 1, 2)), check_logits=True),
    ]
    down = "decoder.layers.0.self_attention.linear_kv_down_proj.weight"
    # Negative 8: TP rank 1 holds a different copy of a TE-replicated down projection.
    diverged = Path(shutil.copytree(v3_te, tmp_path / "neg_te_diverged"))
    _edit_rank_file(_rank_file(diverged, 1, 0, 2), lambda sd: sd[down].add_(0.01))
    # Negative 9: a TE-named file whose down projection is split like the local spec's.
    split = Path(shutil.copytree(v3_te, tmp_path / "neg_te_split"))
    _edit_rank_file(_rank_file(split, 0, 0, 2), lambda sd: sd.update({down: sd[down].chunk(2)[0].clone()}))
    # Negative 10: enorm and hnorm exchanged in every MTP layer: strict loads and the main
    # logits pass, the MTP logits do not.
    mtp_swap = Path(shutil.copytree(v3_local, tmp_path / "neg_mtp_norms"))

    def swap_norms(sd: dict[str, Any]) -> None:
        sd["mtp.layers.0.enorm.weight"], sd["mtp.layers.0.hnorm.weight"] = (
            sd["mtp.layers.0.hnorm.weight"], sd["mtp.layers.0.enorm.weight"])

    for tp_rank in range(2):
        for ep_rank in range(2):
            name = rank_dir_name(tp_rank, 0, 1, ep_rank, 2)
            _edit_rank_file(mtp_swap / "release" / name / "model_optim_rng.pt", swap_norms)
    negative += [
        CheckJob(str(dsv3), str(diverged), tp2pp2_even, te_names=True),
        CheckJob(str(dsv3), str(split), tp2pp2_even, te_names=True),
        CheckJob(str(dsv3), str(mtp_swap), tp2ep2, check_logits=True),
    ]

    jobs = positive + negative
    results = run_checks(WORLD_SIZE, jobs)

    n_pos = len(positive)
    assert_all_ok([r for r in results if r["job"] < n_pos], positive, WORLD_SIZE)
    for index, job in enumerate(positive):
        diffs = [r["max_abs_diff"] for r in results if r["job"] == index and r["max_abs_diff"] is not None]
        assert len(diffs) == 1 and diffs[0] <= 1e-4, (index, diffs)
    vpp_layers = {r["pp_rank"]: r["layers_per_chunk"] for r in results if r["job"] == 1}
    assert vpp_layers == {0: [1, 1], 1: [2, 1]}

    problems = job_problems(results, jobs, WORLD_SIZE)
    assert sorted(problems) == list(range(n_pos, len(jobs))), problems
    text = {i - n_pos: "\n".join(lines) for i, lines in problems.items()}
    assert "missing keys ['decoder.layers.1.mlp.linear_fc2.weight']" in text[0]
    assert "logits max|diff|" in text[1]
    assert "decoder.layers.0.self_attention.bogus.weight" in text[2]
    assert "decoder.layers.0.mlp.linear_fc2.weight: file (64, 128) vs model (64, 64)" in text[2]
    assert "never opened ['mp_rank_00_002']" in text[3]
    assert "decoder.layers.2." in text[4]
    assert "self_attention.linear_qkv.layer_norm_weight" in text[5]
    assert "logits max|diff|" in text[6] and "rank" not in text[6]
    assert f"TE-duplicated weights differ from TP rank 0's copy: ['{down}']" in text[7]
    assert f"{down}: file (12, 64) vs full (24, 64)" in text[8]
    assert text[9].startswith("MTP logits max|diff|") and "\n" not in text[9], text[9]  # main logits passed
    with pytest.raises(AssertionError, match=f"job {n_pos + 1}"):
        assert_all_ok(results, jobs, WORLD_SIZE)
    # Every DeepSeek positive compared the main logits once and, for V3, the MTP logits once.
    for index, mtp in ((n_pos - 3, 1), (n_pos - 2, 1), (n_pos - 1, 0)):
        mtp_diffs = [
            r["mtp_max_abs_diff"] for r in results if r["job"] == index and r["mtp_max_abs_diff"] is not None
        ]
        assert len(mtp_diffs) == mtp and all(d <= 1e-4 for d in mtp_diffs), (index, mtp_diffs)
