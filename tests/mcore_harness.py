"""Load Megatron-Core checkpoints into real megatron-core models on CPU: *legacy* per-rank
files (below), or ``torch_dist`` (``CheckJob.ckpt_format``: every rank builds its chunks and
megatron-core's own ``dist_checkpointing.load`` reads the whole checkpoint with
``StrictHandling.RAISE_ALL``, then ``load_state_dict(strict=True)``). A job can also save what it
loaded with megatron-core's ``dist_checkpointing.save`` (``CheckJob.save_torch_dist``).

This is a test library, not a test module. It answers one question about a checkpoint
written by our converter: "would megatron-core itself accept these files?"

For every job, each of ``world_size`` gloo worker processes:

a. derives its file name from megatron-core's ``parallel_state`` tensor / pipeline /
   expert ranks (never from our converter's code), so a wrong rank -> file mapping shows
   up as a file nobody opened;
b. builds the real ``GPTModel`` chunk(s) of its rank with the *local* layer spec, honoring
   an uneven / interleaved (VPP) layout through ``pipeline_model_parallel_layout``, and
   for MoE models (Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek) routed experts split over EP
   and ETP, with dense layers where the HF config has them (moe_layer_freq); Qwen2-MoE
   gets its sigmoid-gated shared expert (moe_shared_expert_gate); DeepSeek-V2/V3 get
   multi-latent attention, ungated shared experts, their router (sigmoid + expert bias +
   expert groups + scaling for V3) and, on the last stage, MTP layers; GPT-OSS gets linear
   and expert biases, attention sinks (learnable softmax offset), its sliding-window layers
   and the clamped SwiGLU (quick_gelu GLU with offset and clamp);
   Qwen3-Next / Qwen3.5
   hybrids get megatron's GatedDeltaNet and gated self-attention per layer
   (``_hybrid_block_spec``; workarounds WQ1 zero-centered norm, WQ2 FLA-free gated delta rule);
c. strict-loads every chunk, reporting missing / unexpected / mis-shaped keys by name
   (TE names and grouped-GEMM expert names are first mapped back to local-spec names; the
   TE spec's replicated MLA down projections are cut to the local spec's TP shard, and
   all TP ranks must hold the same copy);
d. optionally runs a pipelined fp32 forward pass and compares the logits with
   ``transformers`` on the same input ids (and DeepSeek's MTP logits with a reference
   built from transformers' layers and the HF MTP weights).

Spawning is the expensive part (each process imports torch + megatron, ~3 s), so
``run_checks`` spawns the workers once and runs every job in every process.

The worker side runs this very file as a script (``python mcore_harness.py --rank ...``),
which is why the module-level imports are standard-library only.

See /work/shared/reference/env.md §2 for the CPU workarounds W1-W9 referred to below.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fixtures import dequantize_fp8_blocks, free_port  # its module-level imports are standard-library only too

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE_DIR = "release"
CKPT_FILE = "model_optim_rng.pt"
LOGITS_ATOL = 1e-4
SPAWN_TIMEOUT_S = 600.0
# Timeout of every gloo collective / send / recv: a rank that died mid-job makes its
# peers fail after this long instead of hanging until the whole spawn times out.
COLLECTIVE_TIMEOUT_S = 120.0

# Fixed input of the logits check: shape and seed are part of the contract of the check.
LOGITS_BATCH = 2
LOGITS_SEQ = 12
LOGITS_SEED = 1234

_EXTRA_STATE_SUFFIX = "_extra_state"
# A decoder layer, or the transformer layer inside an MTP layer (megatron-core 0.16 calls it
# transformer_layer, 0.19 mtp_model_layer).
_ANY_LAYER = r"(?:decoder\.layers\.\d+\.|mtp\.layers\.\d+\.(?:transformer_layer|mtp_model_layer)\.)"
_LAYER_KEY_RE = re.compile(rf"^({_ANY_LAYER})(.+)$")
_GROUPED_EXPERT_KEY_RE = re.compile(rf"^({_ANY_LAYER}mlp\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$")
_GROUPED_EXTRA_STATE_RE = re.compile(rf"^{_ANY_LAYER}mlp\.experts\.linear_fc[12]\._extra_state$")
_LOCAL_EXPERT_KEY_RE = re.compile(rf"^{_ANY_LAYER}mlp\.experts\.local_experts\.")
# MLA down projections: TELinear(parallel_mode="duplicated") under TE, TP-split under local.
_MLA_DOWN_PROJ_RE = re.compile(r"(?:^|\.)self_attention\.linear_(?:q|kv)_down_proj\.weight$")
# Local -> TE layer key map of MLA layers. The MLA local spec of megatron-core 0.16 declares
# no sharded_state_dict_keys_map; this is the one megatron declares for MLA in
# post_training/modelopt/gpt/model_specs.py (get_gpt_modelopt_spec(remap_te_layernorm=True):
# mla_qk_layernorm_map + the dense layers' pre-MLP entry). The TE spec fuses q_layernorm /
# kv_layernorm into linear_q_up_proj / linear_kv_up_proj (TELayerNormColumnParallelLinear)
# and a dense layer's pre-MLP norm into mlp.linear_fc1; MoE layers keep pre_mlp_layernorm
# and input_layernorm stays a separate TENorm. Entries apply per layer only where the
# fusing module exists (mla_te_keys_maps filters them).
MLA_TE_KEYS_MAP = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


# --------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Model-parallel layout of a checkpoint.

    ``layers_per_vstage`` lists the decoder layers of every virtual pipeline stage in
    virtual-stage order; chunk ``s`` of pipeline rank ``p`` is virtual stage ``p + s*pp``
    (megatron's interleaved schedule). ``ep`` / ``etp`` are the expert-parallel and
    expert-tensor-parallel sizes of routed experts; ``etp=None`` means megatron's default,
    ETP = TP.
    """

    tp: int
    pp: int
    vpp: int
    layers_per_vstage: tuple[int, ...]
    ep: int = 1
    etp: int | None = None

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple so the dataclass stays hashable.
        object.__setattr__(self, "layers_per_vstage", tuple(int(n) for n in self.layers_per_vstage))
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        if min(self.tp, self.pp, self.vpp, self.ep, self.expert_tp) < 1:
            raise ValueError(f"tp, pp, vpp, ep and etp must be >= 1: {self}")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"virtual pipeline stages need pp > 1: {self}")
        if len(self.layers_per_vstage) != self.pp * self.vpp:
            raise ValueError(f"layers_per_vstage needs pp*vpp={self.pp * self.vpp} entries: {self}")
        if any(n < 0 for n in self.layers_per_vstage):
            raise ValueError(f"negative layer count: {self}")

    @classmethod
    def even(
        cls, tp: int, pp: int, num_layers: int, vpp: int = 1, ep: int = 1, etp: int | None = None
    ) -> Layout:
        """Layout with ``num_layers`` spread evenly (must divide) over the pp*vpp stages."""
        stages = pp * vpp
        if num_layers % stages:
            raise ValueError(f"{num_layers} layers do not divide into {stages} stages")
        return cls(tp, pp, vpp, (num_layers // stages,) * stages, ep, etp)

    @property
    def expert_tp(self) -> int:
        """ETP as an int (``etp`` is resolved to TP in ``__post_init__``)."""
        return self.tp if self.etp is None else self.etp

    def world_size_problem(self, world_size: int) -> str | None:
        """Why megatron cannot lay this out over ``world_size`` ranks, or None."""
        # Dense ranks are tp*pp*dp; expert ranks are etp*ep*pp*expert_dp (same pp).
        for name, size in (("tp*pp", self.tp * self.pp), ("etp*ep*pp", self.expert_tp * self.ep * self.pp)):
            if world_size % size:
                return f"world_size {world_size} not divisible by {name}={size}"
        return None

    @property
    def num_layers(self) -> int:
        return sum(self.layers_per_vstage)

    @property
    def num_vstages(self) -> int:
        return self.pp * self.vpp

    def vstage(self, pp_rank: int, chunk: int) -> int:
        return pp_rank + chunk * self.pp

    def layer_offset(self, vstage: int) -> int:
        """Global index of the first decoder layer of a virtual stage."""
        return sum(self.layers_per_vstage[:vstage])


@dataclass(frozen=True)
class CheckJob:
    """One checkpoint to check; the architecture comes from ``hf_dir/config.json``."""

    hf_dir: str
    mcore_dir: str
    layout: Layout
    te_names: bool = False
    check_logits: bool = False
    tied: bool = False  # share_embeddings_and_output_weights
    grouped_gemm: bool = False  # experts named like TE GroupedLinear (mlp.experts.linear_fc1.weight<j>)
    # DeepSeek MTP layers in the checkpoint; None: the HF config's num_nextn_predict_layers.
    mtp_layers: int | None = None
    # "torch": legacy rank files, strict-loaded per rank; "torch_dist": megatron-core's
    # ``dist_checkpointing.load`` of the whole model's sharded state dict, strict RAISE_ALL.
    ckpt_format: str = "torch"
    # After loading: ``dist_checkpointing.save`` of the loaded model to ``<dir>/release``
    # (with the tracker), i.e. a torch_dist checkpoint written by megatron-core itself.
    save_torch_dist: str | None = None
    # Build the model with this padded vocabulary instead of the checkpoint's (torch_dist: the
    # embedding and output layer load with allow_shape_mismatch, as at another TP).
    padded_vocab: int | None = None
    # With save_torch_dist: also save the state of an Adam optimizer stepped once (megatron-core's
    # FP32Optimizer: optimizer.state.exp_avg/exp_avg_sq.<key> tensors), as a training run would.
    save_optimizer: bool = False

    def arch(self) -> HFArch:
        """The HF architecture, with this job's MTP layer count."""
        arch = read_hf_arch(self.hf_dir)
        return arch if self.mtp_layers is None else dataclasses.replace(arch, mtp_layers=self.mtp_layers)


def _dequantize_fp8_parameters(ckpt: dict) -> None:
    """TE FP8 parameters (read by the converter's allow-listed unpickler, imported below) become
    their values in the nominal dtype, as TE's ``dequantize()`` gives them: without TE, megatron
    builds bf16/fp32 parameters. The formula is the tests' own (``fixtures``), not the converter's."""
    from convert_checkpoint.quant.te_pickle import Fp8BlockRecord

    for key, entry in ckpt.items():
        if not (re.fullmatch(r"model\d*", key) and isinstance(entry, dict)):
            continue
        for name, value in entry.items():
            if isinstance(value, Fp8BlockRecord):
                entry[name] = dequantize_fp8_blocks(value.rowwise_data, value.rowwise_scale_inv, value.nominal_dtype,
                                                    shape=value.shape)


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Legacy per-rank directory under ``release/`` (megatron-LM's naming rule).

    ``mp_rank_TT``, then ``_PPP`` only if pp > 1, then ``_EEE`` only if ep > 1.
    """
    name = f"mp_rank_{tp_rank:02d}"
    if pp > 1:
        name += f"_{pp_rank:03d}"
    if ep > 1:
        name += f"_{ep_rank:03d}"
    return name


# --------------------------------------------------------------------------------------
# HF architecture (shared by parent-side validation and workers)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFArch:
    model_type: str
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    rope_type: str
    vocab_size: int
    max_position_embeddings: int
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    # Routed experts (0 = dense model): on every layer unless ``moe_layers`` says otherwise.
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_topk: int = 0
    # HF renormalizes the top-k probabilities (Mixtral always, Qwen3-MoE / DeepSeek-V3 if norm_topk_prob).
    moe_renormalize: bool = False
    # ----- DeepSeek-V2/V3 (multi-latent attention) -----
    mla: bool = False
    q_lora_rank: int | None = None  # None: a plain q_proj (V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # HF rotates interleaved pairs (x0,x1),(x2,x3).. of the rope dims (V3 rope_interleave, V2 always).
    rope_interleave: bool = False
    # One entry per decoder layer, 1 = MoE MLP, 0 = dense MLP; () = MoE on every layer (if num_experts).
    moe_layers: tuple[int, ...] = ()
    shared_expert_ffn_hidden_size: int = 0  # n_shared_experts * moe_intermediate_size; 0 = none
    # Qwen2-MoE: the shared expert's output is scaled by sigmoid(x @ shared_expert_gate.T).
    moe_shared_expert_gate: bool = False
    moe_score_function: str = "softmax"  # "softmax" or "sigmoid" (V3)
    moe_expert_bias: bool = False  # V3's e_score_correction_bias (added for selection only)
    moe_num_groups: int | None = None  # group-limited routing: n_group / topk_group
    moe_group_topk: int | None = None
    # How many of its best scores HF sums to rank a group (V3: 2, V2 group_limited_greedy: max = 1).
    moe_group_score_topn: int | None = None
    moe_scaling_factor: float | None = None  # routed_scaling_factor (None = 1)
    mtp_layers: int = 0  # DeepSeek multi-token prediction layers (num_nextn_predict_layers)
    # GLM-4.5: RoPE on the first partial_rotary_factor of each head's dims (rotate-half, like
    # megatron's rotary_percent).
    rotary_percent: float = 1.0
    # MiniMax-M2: q/k RMSNorms over the whole projection (heads x head_dim), not per head.
    full_width_qk_norm: bool = False
    # GPT-OSS: biases on every linear (o_proj, router, experts: megatron's add_bias_linear),
    # attention sinks (megatron's softmax_type "learnable"), a sliding window on the layers
    # ``window_layers`` marks 1 (megatron's window_size + window_attn_skip_freq list) and the
    # clamped SwiGLU (megatron's quick_gelu GLU with glu_linear_offset 1 and a clamp).
    linear_bias: bool = False
    attention_sinks: bool = False
    sliding_window: int = 0
    window_layers: tuple[int, ...] = ()
    swiglu_limit: float | None = None
    # Qwen3-Next / Qwen3.5: per layer 1 = gated delta-net (linear attention), 0 = full attention
    # (megatron's linear_attention_freq list); () = no linear attention.
    linear_attention: tuple[int, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    attention_output_gate: bool = False  # q_proj carries a sigmoid gate per head
    zero_centered_norm: bool = False  # RMSNorms compute x * (1 + weight)


_SUPPORTED_MODEL_TYPES = (
    "llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "glm4_moe",
    "minimax_m2", "gpt_oss", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text",
)
_MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_HYBRID_MODEL_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")  # gated delta-net + gated attention


def _read_moe(cfg: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """MoE fields of HFArch for Qwen2-MoE / Qwen3-MoE / Mixtral / DeepSeek; {} for dense families."""
    if model_type in _MLA_MODEL_TYPES:
        return _read_deepseek(cfg, model_type)
    if model_type == "glm4_moe":
        # GLM-4.5: DeepSeek-V3's MoE block and MTP (same router: sigmoid, score-correction bias,
        # groups, norm_topk_prob, routed_scaling_factor) under plain GQA attention.
        no_mla = {"q_lora_rank": None, "kv_lora_rank": 0, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "v_head_dim": 0}
        fields = _read_deepseek({**cfg, **no_mla}, "deepseek_v3")
        fields.update(mla=False, q_lora_rank=None, kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=0,
                      v_head_dim=0, rope_interleave=False)
        return fields
    if model_type == "minimax_m2":
        # Mixtral's experts on every layer; router: sigmoid scores, top-k on scores + bias,
        # weights = the unbiased scores renormalized (megatron's sigmoid router with expert bias).
        return {
            "num_experts": int(cfg["num_local_experts"]),
            "moe_ffn_hidden_size": int(cfg["intermediate_size"]),
            "moe_topk": int(cfg["num_experts_per_tok"]),
            "moe_renormalize": True,
            "moe_score_function": "sigmoid",
            "moe_expert_bias": True,
        }
    if model_type == "gpt_oss":
        # Every layer MoE; router logits = x W^T + b, top-k, softmax over the k kept logits
        # (= the renormalized top-k of the full softmax, megatron's pre_softmax=False).
        return {
            "num_experts": int(cfg["num_local_experts"]),
            "moe_ffn_hidden_size": int(cfg["intermediate_size"]),
            "moe_topk": int(cfg["num_experts_per_tok"]),
            "moe_renormalize": True,
        }
    if model_type not in ("qwen2_moe", "qwen3_moe", "mixtral", "qwen3_next", "qwen3_5_moe_text"):
        return {}
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts, older versions as num_experts.
    num_experts = cfg.get("num_local_experts") or cfg["num_experts"]
    moe_layers: tuple[int, ...] = ()
    shared: dict[str, Any] = {}
    if model_type in ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text"):
        # transformers: MoE unless listed in mlp_only_layers, on every decoder_sparse_step-th layer.
        step, dense = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or ())
        pattern = tuple(
            0 if i in dense or (i + 1) % step else 1 for i in range(int(cfg["num_hidden_layers"]))
        )
        moe_layers = pattern if 0 in pattern else ()
        shared_ffn = int(cfg.get("shared_expert_intermediate_size") or 0)
        if model_type in ("qwen2_moe", "qwen3_next", "qwen3_5_moe_text"):
            # Qwen2MoeSparseMoeBlock: routed experts + sigmoid(shared_expert_gate(x)) * shared_expert(x)
            # (Qwen3-Next's and Qwen3.5's blocks are the same).
            shared = {"shared_expert_ffn_hidden_size": shared_ffn, "moe_shared_expert_gate": shared_ffn > 0}
        elif shared_ffn:
            raise ValueError("Qwen3-MoE with shared experts is not supported")
        expert_ffn, renormalize = cfg["moe_intermediate_size"], bool(cfg.get("norm_topk_prob", False))
        if model_type == "qwen3_5_moe_text":
            renormalize = True  # Qwen3_5MoeTopKRouter always renormalizes the top-k
    else:
        expert_ffn, renormalize = cfg["intermediate_size"], True  # Mixtral's intermediate_size is per expert
    return {
        "num_experts": int(num_experts),
        "moe_ffn_hidden_size": int(expert_ffn),
        "moe_topk": int(cfg["num_experts_per_tok"]),
        "moe_renormalize": renormalize,
        "moe_layers": moe_layers,
        **shared,
    }


def _read_deepseek(cfg: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """MLA, MoE-layer pattern, shared experts, router and MTP fields of a DeepSeek-V2/V3 config."""
    num_layers = int(cfg["num_hidden_layers"])
    num_experts = int(cfg.get("n_routed_experts") or 0)
    if not num_experts:
        raise ValueError("DeepSeek configs without routed experts are not supported")
    if int(cfg.get("moe_layer_freq", 1)) != 1:
        # transformers ignores moe_layer_freq (MoE on every layer from first_k_dense_replace on).
        raise ValueError(f"moe_layer_freq={cfg['moe_layer_freq']} is not supported")
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    q_lora = cfg.get("q_lora_rank")
    fields: dict[str, Any] = {
        "mla": True,
        "q_lora_rank": int(q_lora) if q_lora else None,
        "kv_lora_rank": int(cfg["kv_lora_rank"]),
        "qk_nope_head_dim": int(cfg["qk_nope_head_dim"]),
        "qk_rope_head_dim": int(cfg["qk_rope_head_dim"]),
        "v_head_dim": int(cfg["v_head_dim"]),
        "num_experts": num_experts,
        "moe_ffn_hidden_size": int(cfg["moe_intermediate_size"]),
        "moe_topk": int(cfg["num_experts_per_tok"]),
        "moe_layers": tuple(0 if i < first_dense else 1 for i in range(num_layers)),
        "shared_expert_ffn_hidden_size": int(cfg.get("n_shared_experts") or 0)
        * int(cfg["moe_intermediate_size"]),
        "moe_scaling_factor": float(cfg.get("routed_scaling_factor") or 1.0),
    }
    if model_type == "deepseek_v3":
        # noaux_tc: sigmoid scores, score-correction bias for selection, groups ranked by
        # the sum of their 2 best biased scores, optional renormalization, then scaling.
        fields.update(
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            moe_score_function="sigmoid",
            moe_expert_bias=True,
            moe_renormalize=bool(cfg.get("norm_topk_prob", False)),
            mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
        )
        groups = int(cfg.get("n_group") or 1)
        if groups > 1:
            fields.update(moe_num_groups=groups, moe_group_topk=int(cfg["topk_group"]), moe_group_score_topn=2)
    else:
        # V2: softmax over all experts, top-k never renormalized; rope on complex pairs.
        fields.update(rope_interleave=True, moe_score_function="softmax", moe_renormalize=False)
        method = cfg.get("topk_method", "greedy")
        if method == "group_limited_greedy":
            fields.update(
                moe_num_groups=int(cfg["n_group"]),
                moe_group_topk=int(cfg["topk_group"]),
                moe_group_score_topn=1,
            )
        elif method != "greedy":
            raise ValueError(f"DeepSeek-V2 topk_method {method!r} is not supported")
    return fields


def read_hf_arch(hf_dir: str | os.PathLike[str]) -> HFArch:
    """Parse the subset of a Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE / Mixtral /
    DeepSeek-V2/V3 ``config.json`` the harness needs."""
    cfg: dict[str, Any] = json.loads(Path(hf_dir, "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; expected one of {_SUPPORTED_MODEL_TYPES}")
    if cfg.get("hidden_act", "silu") != "silu" and model_type != "gpt_oss":
        raise ValueError(f"only SwiGLU (hidden_act='silu') is supported, got {cfg.get('hidden_act')!r}")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported (the harness builds add_bias_linear=False)")
    if model_type in _MLA_MODEL_TYPES and cfg.get("attention_bias"):
        raise ValueError("MLA with attention_bias=True is not supported")
    if model_type in ("qwen2", "qwen2_moe") and cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported (the harness builds full attention)")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    # transformers 5 keeps rope settings under "rope_parameters"; older configs use the
    # top-level "rope_theta" / "rope_scaling".
    rope_params = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling") or {}
    rope_theta = rope_params.get("rope_theta", cfg.get("rope_theta")) or 10000.0
    rope_type = (
        rope_params.get("rope_type") or rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    )
    return HFArch(
        model_type=model_type,
        hidden_size=hidden,
        ffn_hidden_size=int(cfg.get("intermediate_size") or cfg["moe_intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_type=str(rope_type),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        # Qwen2 always has q/k/v biases, Qwen2-MoE unless qkv_bias=False (transformers 5; older
        # configs lack the field and always have them); the others declare it with attention_bias.
        qkv_bias=(
            model_type == "qwen2"
            or (model_type == "qwen2_moe" and bool(cfg.get("qkv_bias", True)))
            or bool(cfg.get("attention_bias"))
        ),
        # MLA: the q_a / kv_a layernorms are megatron's qk_layernorm (q_layernorm / kv_layernorm).
        qk_norm=model_type in ("qwen3", "qwen3_moe", *_MLA_MODEL_TYPES, *_HYBRID_MODEL_TYPES)
        or (model_type == "glm4_moe" and bool(cfg.get("use_qk_norm")))
        or model_type == "minimax_m2",
        full_width_qk_norm=model_type == "minimax_m2",
        rotary_percent=float(rope_params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **_read_moe(cfg, model_type),
        **(_read_gpt_oss(cfg) if model_type == "gpt_oss" else {}),
        **_read_linear_attention(cfg, model_type),
    )


def _read_gpt_oss(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """GPT-OSS's biases, sinks, sliding-window layers and clamped SwiGLU."""
    if float(cfg.get("swiglu_alpha", 1.702)) != 1.702:  # megatron's quick_gelu is x * sigmoid(1.702 x)
        raise ValueError(f"swiglu_alpha {cfg['swiglu_alpha']} is not quick_gelu's 1.702")
    layer_types = cfg.get("layer_types") or []
    return {
        "linear_bias": bool(cfg.get("attention_bias", True)),
        "attention_sinks": True,
        "sliding_window": int(cfg.get("sliding_window") or 0),
        "window_layers": tuple(int(t == "sliding_attention") for t in layer_types),
        "swiglu_limit": float(cfg.get("swiglu_limit", 7.0)),
    }


def _read_linear_attention(cfg: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """Qwen3-Next / Qwen3.5: the linear/full attention pattern and the gated delta-net sizes."""
    if model_type not in _HYBRID_MODEL_TYPES:
        return {}
    layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        interval = int(cfg.get("full_attention_interval") or 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    if len(types) != layers or set(types) - {"linear_attention", "full_attention"}:
        raise ValueError(f"layer_types {types} does not fit {layers} layers")
    return {
        "linear_attention": tuple(int(t == "linear_attention") for t in types),
        **{k: int(cfg[k]) for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                    "linear_value_head_dim", "linear_conv_kernel_dim")},
        "attention_output_gate": True,
        "zero_centered_norm": True,
        "mtp_layers": int(cfg.get("mtp_num_hidden_layers") or 0),  # Qwen3-Next's mtp.* head
    }


# --------------------------------------------------------------------------------------
# TE -> local key renaming (pure; uses the map megatron-core declares in its layer spec)
# --------------------------------------------------------------------------------------


def rename_te_to_local(
    state_dict: Mapping[str, Any],
    keys_map: Mapping[str, str],
    layer_keys_maps: Mapping[int | str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """Rename TE-spec layer keys to local-spec keys.

    ``keys_map`` is megatron-core's ``sharded_state_dict_keys_map`` (local prefix -> TE
    prefix, relative to one layer, e.g. ``"input_layernorm." ->
    "self_attention.linear_qkv.layer_norm_"``); it is inverted and applied to every
    ``decoder.layers.{i}.`` key and to the transformer layer of every MTP layer
    (``mtp.layers.{k}.transformer_layer.``). ``layer_keys_maps`` replaces it for the given
    local decoder layer indices (int) or full layer prefixes (str, e.g.
    ``"mtp.layers.0.transformer_layer."``): an MoE layer keeps its own pre-MLP norm under
    TE, so it has no ``pre_mlp_layernorm.`` entry. A local-style name for a mapped module, or two keys
    collapsing onto one name, is an error: the file would not be a consistent TE-named
    checkpoint.
    """
    layer_keys_maps = layer_keys_maps or {}
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in state_dict.items():
        new_key = key
        match = _LAYER_KEY_RE.match(key)
        if match:
            prefix, rest = match.groups()
            if prefix in layer_keys_maps:
                layer_map = layer_keys_maps[prefix]
            elif prefix.startswith("decoder."):
                layer_map = layer_keys_maps.get(int(prefix.split(".")[2]), keys_map)
            else:
                layer_map = keys_map
            inverse = {te: local for local, te in layer_map.items()}
            if any(rest.startswith(local) for local in layer_map):
                problems.append(f"local-style key in a TE-named checkpoint: {key}")
            for te_prefix, local_prefix in inverse.items():
                if rest.startswith(te_prefix):
                    new_key = prefix + local_prefix + rest[len(te_prefix) :]
                    break
        if new_key in out:
            problems.append(f"two keys map to {new_key} after TE->local renaming")
        out[new_key] = value
    if problems:
        raise KeyError("; ".join(problems))
    return out


def split_duplicated_to_tp(
    state_dict: Mapping[str, Any], tp: int, tp_rank: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """TE-spec MLA down projections (full on every TP rank) -> this rank's local-spec shard.

    Under the TE spec megatron builds ``linear_q_down_proj`` / ``linear_kv_down_proj`` as
    ``TELinear(parallel_mode="duplicated")``: every TP rank holds the full weight. The local
    spec builds them as ``ColumnParallelLinear(gather_output=False)`` and MLA gathers their
    outputs over TP in rank order (gather_from_tensor_model_parallel_region), so TP rank
    ``r`` owns output rows ``[r*n/tp, (r+1)*n/tp)``: the contiguous dim-0 split megatron
    uses to partition a column-parallel master weight (``_initialize_affine_weight_cpu``)
    and the shard dist-checkpointing would load into a local model from the TE model's
    replicated global tensor (``make_sharded_tensors_for_checkpoint``, tp axis 0). Returns
    the state dict with those keys sliced, and the full tensors (to check that all TP
    ranks hold the same copy). Rows must divide by ``tp``; otherwise raises KeyError.
    """
    out: dict[str, Any] = {}
    full: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in state_dict.items():
        if _MLA_DOWN_PROJ_RE.search(key) and hasattr(value, "shape") and tp > 1:
            if value.shape[0] % tp:
                problems.append(f"{key}: {tuple(value.shape)} rows do not split over TP={tp}")
            else:
                full[key] = value
                value = value.chunk(tp, dim=0)[tp_rank].clone()
        out[key] = value
    if problems:
        raise KeyError("; ".join(problems))
    return out, full


def rename_grouped_experts_to_local(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Map TE GroupedLinear expert keys to the local spec's SequentialMLP keys.

    With grouped GEMM, megatron's TE spec stores the experts of one EP rank as
    ``mlp.experts.linear_fc{1,2}.weight{j}`` (``j`` = local expert index) plus one
    ``mlp.experts.linear_fc{1,2}._extra_state``. The local spec cannot build that module
    (it ignores grouped GEMM: SequentialMLP, or a legacy GroupedMLP that needs the
    grouped_gemm package), so every ``weight{j}`` becomes
    ``mlp.experts.local_experts.{j}.linear_fc{1,2}.weight`` (same tensor, same shape), and
    the shared extra state, which holds no weights, is dropped. A ``local_experts`` key in
    the same file is an error: the file would mix the two namings.
    """
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in state_dict.items():
        new_key: str | None = key
        if _LOCAL_EXPERT_KEY_RE.match(key):
            problems.append(f"SequentialMLP-style expert key in a grouped-GEMM checkpoint: {key}")
        elif match := _GROUPED_EXPERT_KEY_RE.match(key):
            prefix, linear, param, index = match.groups()
            new_key = f"{prefix}local_experts.{index}.{linear}.{param}"
        elif _GROUPED_EXTRA_STATE_RE.match(key):
            new_key = None
        if new_key is None:
            continue
        if new_key in out:
            problems.append(f"two keys map to {new_key} after grouped->local renaming")
        out[new_key] = value
    if problems:
        raise KeyError("; ".join(problems))
    return out


def _is_extra_state(key: str) -> bool:
    return key.endswith(_EXTRA_STATE_SUFFIX)


# --------------------------------------------------------------------------------------
# Parent side: spawn once, collect, judge
# --------------------------------------------------------------------------------------


def _job_to_json(job: CheckJob) -> dict[str, Any]:
    return dataclasses.asdict(job)


def _job_from_json(data: Mapping[str, Any]) -> CheckJob:
    layout = Layout(**data["layout"])
    return CheckJob(**{**data, "layout": layout})


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text[-limit:]


def run_checks(
    world_size: int,
    jobs: Sequence[CheckJob],
    *,
    timeout_s: float = SPAWN_TIMEOUT_S,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Spawn ``world_size`` gloo workers once and run every job on every rank.

    Returns one result dict per (job, rank), sorted by job then rank, with keys:
    ``job, rank, tp_rank, pp_rank, dp_rank, ep_rank, files, ok, err, max_abs_diff,
    max_abs_logit, mtp_max_abs_diff, layers_per_chunk, mtp_layers_per_chunk, local_experts,
    renamed, seconds, worker_startup_s``.
    ``local_experts`` lists, per chunk, the global expert indices megatron placed on the
    rank (``[]`` for a dense model or stage); ``renamed`` counts keys renamed from TE /
    grouped-GEMM names; ``mtp_max_abs_diff`` is the MTP logits' difference (DeepSeek MTP
    layers only) on the rank that compared logits. A job failure is reported in
    ``ok``/``err``; a worker crash or the whole run exceeding ``timeout_s`` raises (with the
    workers' log tails).
    """
    jobs = list(jobs)
    for index, job in enumerate(jobs):
        problem = job.layout.world_size_problem(world_size)
        if problem:
            raise ValueError(f"job {index}: {problem}")
    if not jobs:
        return []

    with tempfile.TemporaryDirectory(prefix="mcore_harness_") as tmp:
        work = Path(tmp)
        jobs_file = work / "jobs.json"
        jobs_file.write_text(json.dumps([_job_to_json(job) for job in jobs]))
        env = dict(os.environ)
        # One thread per worker: the box has 2 cores and several workers.
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        port = free_port()
        logs = [work / f"rank{rank}.log" for rank in range(world_size)]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank in range(world_size):
                with open(logs[rank], "wb") as log:
                    procs.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                str(Path(__file__).resolve()),
                                "--rank", str(rank),
                                "--world-size", str(world_size),
                                "--port", str(port),
                                "--jobs", str(jobs_file),
                                "--out", str(work),
                                "--collective-timeout", str(collective_timeout_s),
                            ],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                        )
                    )
            _wait_for_workers(procs, logs, timeout_s)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

        results: list[dict[str, Any]] = []
        for rank in range(world_size):
            out_file = work / f"rank{rank}.json"
            rank_results = json.loads(out_file.read_text()) if out_file.exists() else []
            if len(rank_results) != len(jobs):
                raise RuntimeError(
                    f"rank {rank} reported {len(rank_results)} of {len(jobs)} jobs; "
                    f"log tail:\n{_tail(logs[rank])}"
                )
            results.extend(rank_results)
    results.sort(key=lambda r: (r["job"], r["rank"]))
    return results


def _wait_for_workers(procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            # A crashed worker leaves its peers blocked in a collective: stop them now.
            details = "\n".join(f"--- rank {r} (exit {codes[r]}) ---\n{_tail(logs[r])}" for r in failed)
            raise RuntimeError(f"harness worker(s) {failed} crashed:\n{details}")
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            running = [rank for rank, code in enumerate(codes) if code is None]
            details = "\n".join(f"--- rank {r} ---\n{_tail(logs[r], 1500)}" for r in running)
            raise TimeoutError(f"harness workers {running} still running after {timeout_s:.0f} s:\n{details}")
        time.sleep(0.05)


def assert_only_negatives_fail(results: Sequence[Mapping[str, Any]], jobs: Sequence[CheckJob], world_size: int,
                               first_negative: int) -> None:
    """Jobs before ``first_negative`` pass every check; each one from there on (a negative
    control: same keys and shapes, wrong values) loads strictly and fails on the logits only."""
    problems = job_problems(results, jobs, world_size)
    assert sorted(problems) == list(range(first_negative, len(jobs))), problems
    for index in problems:
        assert "logits max|diff|" in "\n".join(problems[index]), problems[index]
        assert all(r["ok"] for r in results if r["job"] == index)  # strict loads passed


def job_problems(
    results: Sequence[Mapping[str, Any]],
    jobs: Sequence[CheckJob],
    world_size: int,
    atol: float = LOGITS_ATOL,
) -> dict[int, list[str]]:
    """Everything wrong with each job, as readable lines; jobs without problems are absent."""
    problems: dict[int, list[str]] = {}
    for index, job in enumerate(jobs):
        lines: list[str] = []
        job_results = [r for r in results if r["job"] == index]
        ranks = sorted(r["rank"] for r in job_results)
        if ranks != list(range(world_size)):
            lines.append(f"results from ranks {ranks}, expected 0..{world_size - 1}")
        for res in job_results:
            if not res["ok"]:
                where = f"tp{res['tp_rank']} pp{res['pp_rank']} ep{res['ep_rank']} dp{res['dp_rank']}"
                lines.append(f"rank {res['rank']} ({where}): {res['err']}")

        release = Path(job.mcore_dir, RELEASE_DIR)
        on_disk = {p.name for p in release.glob("mp_rank_*")} if release.is_dir() else set()
        opened = {name for res in job_results for name in res["files"]}
        if on_disk != opened:
            lines.append(
                f"rank files on disk != files megatron ranks opened: "
                f"never opened {sorted(on_disk - opened)}, missing on disk {sorted(opened - on_disk)}"
            )

        if job.check_logits:
            diffs = [r["max_abs_diff"] for r in job_results if r.get("max_abs_diff") is not None]
            if not diffs:
                lines.append("logits check requested but no rank computed it")
            elif max(diffs) > atol:
                lines.append(f"logits max|diff| {max(diffs):.3e} > {atol:.0e} (vs transformers)")
            try:
                mtp_layers = job.arch().mtp_layers
            except (OSError, ValueError, KeyError):
                mtp_layers = 0  # the workers report an unreadable config
            mtp_diffs = [r["mtp_max_abs_diff"] for r in job_results if r.get("mtp_max_abs_diff") is not None]
            if mtp_layers and diffs and not mtp_diffs:
                lines.append("MTP logits check expected but no rank computed it")
            elif mtp_diffs and max(mtp_diffs) > atol:
                lines.append(
                    f"MTP logits max|diff| {max(mtp_diffs):.3e} > {atol:.0e}"
                    " (vs transformers' layers with the HF MTP weights)"
                )
        if lines:
            problems[index] = lines
    return problems


def assert_all_ok(
    results: Sequence[Mapping[str, Any]],
    jobs: Sequence[CheckJob],
    world_size: int,
    atol: float = LOGITS_ATOL,
) -> None:
    """Raise AssertionError listing every failed rank, file-set mismatch or logits excess."""
    problems = job_problems(results, jobs, world_size, atol)
    if problems:
        parts = []
        for index, lines in sorted(problems.items()):
            job = jobs[index]
            header = (
                f"job {index}: {job.mcore_dir} {job.layout} te_names={job.te_names} tied={job.tied}"
                f" grouped_gemm={job.grouped_gemm}"
            )
            parts.append(header + "\n" + "\n".join(f"  - {line}" for line in lines))
        raise AssertionError("megatron-core checks failed:\n" + "\n".join(parts))


# --------------------------------------------------------------------------------------
# Worker side (runs in the spawned processes only; imports torch / megatron lazily)
# --------------------------------------------------------------------------------------


class CheckFailure(Exception):
    """A checkpoint problem (as opposed to a harness crash); message is shown verbatim."""


def _apply_cpu_workarounds() -> None:
    """Patch what megatron-core assumes about CUDA; must run before megatron is imported."""
    # W9: megatron-core 0.19 does a bare `import triton` in moe/ops/paged_stash.py. Stub
    # that module only when triton is missing *and* the installed megatron has it (0.16
    # has no such module). A fake `triton` would break torch._inductor instead.
    try:
        import triton  # noqa: F401
    except ImportError:
        spec = importlib.util.find_spec("megatron")
        roots = list(spec.submodule_search_locations or []) if spec else []
        if any(Path(root, "core", "transformer", "moe", "ops", "paged_stash.py").exists() for root in roots):
            stub = types.ModuleType("megatron.core.transformer.moe.ops.paged_stash")
            stub.GLOBAL_BLOCK_SIZE = 1024  # type: ignore[attr-defined]
            stub.paged_stash_copy_kernel = None  # type: ignore[attr-defined]
            stub.paged_stash_pop_kernel = None  # type: ignore[attr-defined]
            sys.modules[stub.__name__] = stub

    import torch

    torch.set_num_threads(1)
    # W2: RotaryEmbedding moves inv_freq to torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    # W7: tied embeddings with PP>1 all-reduce `weight.data.cuda()` at model init.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    # W8: dist_checkpointing.save synchronizes CUDA streams.
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]


def _patch_megatron_after_import() -> None:
    """Workarounds that need megatron imported (unlike ``_apply_cpu_workarounds``)."""
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16.1 imports te_general_gemm only inside `try: ... except ImportError`
    # with no fallback, so without TE every MoE router forward raises NameError in
    # RouterGatingLinearFunction.forward. None selects its torch.mm path.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # type: ignore[attr-defined]

    # megatron-core 0.16.1 without TE: extensions/transformer_engine.py swaps the missing
    # `transformer_engine` for a MagicMock, so multi_latent_attention.py's
    # `from ...transformer_engine import TELinear` succeeds and sets HAVE_TE = True with
    # TELinear a mock; MultiLatentAttention.__init__ then fails on
    # `isinstance(self.linear_proj, TELinear)` (TypeError). HAVE_TE = False skips that
    # fp8-only branch; the spec checks `in [TELinear]` compare by identity and stay False.
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer import multi_latent_attention as mla

    if not getattr(te_ext, "HAVE_TE", True):
        mla.HAVE_TE = False  # type: ignore[attr-defined]

    # W11: the sliding-window mask (GPT-OSS) is built on "cuda"; the same mask on the CPU.
    import torch
    from megatron.core.fusions import fused_softmax

    def sliding_window_causal_mask(sq: int, skv: int, window_size: Any) -> Any:
        keep = torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq - window_size[0]).tril(skv - sq + window_size[1])
        return ~keep  # True means masked

    fused_softmax.get_sliding_window_causal_mask = sliding_window_causal_mask  # type: ignore[attr-defined]


def _quick_gelu() -> Any:
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    return quick_gelu


class _Worker:
    def __init__(self, rank: int, world_size: int, collective_timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.collective_timeout_s = collective_timeout_s
        self._parallel_key: tuple[int, ...] | None = None
        # (key, full tensor) of the TE-duplicated weights loaded in the current job.
        self.duplicated: list[tuple[str, Any]] = []

    # ----- parallel state -----

    def init_parallel(self, layout: Layout) -> None:
        """(Re)initialize megatron's parallel state for ``layout``.

        Consecutive jobs with the same (tp, pp, vpp, ep, etp) reuse the groups:
        destroy_model_parallel only forgets groups without freeing them, so re-creating them
        per job would pile up gloo groups for nothing.
        """
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        key = (layout.tp, layout.pp, layout.vpp, layout.ep, layout.expert_tp)
        if key != self._parallel_key:
            self._parallel_key = None
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(
                tensor_model_parallel_size=layout.tp,
                pipeline_model_parallel_size=layout.pp,
                virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
                expert_model_parallel_size=layout.ep,
                expert_tensor_parallel_size=layout.expert_tp,
                distributed_timeout_minutes=max(1, math.ceil(self.collective_timeout_s / 60)),
                # The extra gloo copies of the data-parallel groups are for optimizers only.
                create_gloo_process_groups=False,
            )
            self._parallel_key = key
        # W1: the inference tracker makes the RNG fork a no-op instead of touching CUDA.
        tensor_parallel.model_parallel_cuda_manual_seed(LOGITS_SEED, inference_rng_tracker=True)

    # ----- one job -----

    def run_job(self, index: int, job: CheckJob) -> dict[str, Any]:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        started = time.monotonic()
        result: dict[str, Any] = {
            "job": index,
            "rank": self.rank,
            "tp_rank": None,
            "pp_rank": None,
            "dp_rank": None,
            "ep_rank": None,
            "files": [],
            "ok": True,
            "err": None,
            "max_abs_diff": None,
            "max_abs_logit": None,
            "mtp_max_abs_diff": None,
            "mtp_layers_per_chunk": None,
            "layers_per_chunk": None,
            "local_experts": None,
            "renamed": 0,
        }
        chunks: list[Any] = []
        sharded: dict[str, Any] = {}
        arch: HFArch | None = None
        self.duplicated = []
        try:
            self.init_parallel(job.layout)
            tp_rank = ps.get_tensor_model_parallel_rank()
            pp_rank = ps.get_pipeline_model_parallel_rank()
            ep_rank = ps.get_expert_model_parallel_rank()
            result.update(
                tp_rank=tp_rank, pp_rank=pp_rank, ep_rank=ep_rank, dp_rank=ps.get_data_parallel_rank()
            )
            arch = job.arch()
            if job.ckpt_format == "torch_dist":
                ckpt = self.open_torch_dist(job)
            else:
                ckpt = self.open_rank_file(job, arch, tp_rank, pp_rank, ep_rank, result["files"])
            chunks = self.build_chunks(job, arch, padded_vocab_size=job.padded_vocab or _padded_vocab_size(ckpt, arch))
            result["layers_per_chunk"] = [len(model.decoder.layers) for model in chunks]
            result["local_experts"] = [_local_expert_indices(model) for model in chunks]
            result["mtp_layers_per_chunk"] = [
                len(model.mtp.layers) if getattr(model, "mtp_process", False) else 0 for model in chunks
            ]
            if job.ckpt_format == "torch_dist":
                sharded = _sharded_state_dicts(job, chunks)
            else:
                result["renamed"] = self.load_chunks(job, arch, ckpt, chunks)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a report
            result.update(ok=False, err=_describe(exc))
        # dist_checkpointing.load runs collectives: every rank enters it, or none.
        if job.ckpt_format == "torch_dist" and _all_ranks_true(result["ok"]):
            try:
                self.load_torch_dist(job, sharded, chunks)
            except Exception as exc:  # noqa: BLE001
                result.update(ok=False, err=_describe(exc))
        if job.save_torch_dist and _all_ranks_true(result["ok"]):
            try:
                self.save_torch_dist(job, chunks)
            except Exception as exc:  # noqa: BLE001
                result.update(ok=False, err=_describe(exc))

        # The collectives below need every rank: run them only if all of them loaded.
        loaded_everywhere = _all_ranks_true(result["ok"])
        if job.te_names and loaded_everywhere and arch is not None and arch.mla:
            try:
                self.check_duplicated_copies()
            except Exception as exc:  # noqa: BLE001
                result.update(ok=False, err=_describe(exc))
        if job.check_logits and loaded_everywhere and arch is not None:
            try:
                diff, max_logit, mtp_diff = self.check_logits(job, arch, chunks)
                result.update(max_abs_diff=diff, max_abs_logit=max_logit, mtp_max_abs_diff=mtp_diff)
            except Exception as exc:  # noqa: BLE001
                result.update(ok=False, err=_describe(exc))
        del chunks
        self.duplicated = []
        # Keep the ranks in step between jobs (the next job may re-create groups).
        dist.barrier()
        result["seconds"] = round(time.monotonic() - started, 3)
        return result

    def open_rank_file(
        self, job: CheckJob, arch: HFArch, tp_rank: int, pp_rank: int, ep_rank: int, opened: list[str]
    ) -> dict[str, Any]:
        import torch

        tracker = Path(job.mcore_dir, TRACKER_FILE)
        if not tracker.is_file():
            raise CheckFailure(f"missing {tracker}")
        if tracker.read_text().strip() != RELEASE_DIR:
            raise CheckFailure(f"{tracker} contains {tracker.read_text().strip()!r}, expected 'release'")
        name = rank_dir_name(tp_rank, pp_rank, job.layout.pp, ep_rank, job.layout.ep)
        opened.append(name)
        path = Path(job.mcore_dir, RELEASE_DIR, name, CKPT_FILE)
        if not path.is_file():
            raise CheckFailure(f"missing rank file {path}")
        # The legacy format stores the training args as an argparse.Namespace; TE FP8 parameters
        # are allow-listed by the converter's te_pickle (plain records, no TE needed).
        from convert_checkpoint.quant import te_pickle

        te_pickle.allow_in_torch_load()
        torch.serialization.add_safe_globals([argparse.Namespace])
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict):
            raise CheckFailure(f"{path}: top level is {type(ckpt).__name__}, expected dict")
        _dequantize_fp8_parameters(ckpt)

        expected_models = _model_entry_names(job.layout.vpp)
        present_models = sorted(k for k in ckpt if re.fullmatch(r"model\d*", k))
        if present_models != sorted(expected_models):
            raise CheckFailure(f"{name}: model entries {present_models}, expected {expected_models}")
        if ckpt.get("checkpoint_version") != 3.0:
            raise CheckFailure(f"{name}: checkpoint_version {ckpt.get('checkpoint_version')!r}, expected 3.0")
        args = ckpt.get("args")
        if not isinstance(args, argparse.Namespace):
            raise CheckFailure(f"{name}: 'args' is {type(args).__name__}, expected argparse.Namespace")
        expected_args: list[tuple[str, Any]] = [
            ("tensor_model_parallel_size", job.layout.tp),
            ("pipeline_model_parallel_size", job.layout.pp),
        ]
        if arch.num_experts:
            expected_args += [
                ("expert_model_parallel_size", job.layout.ep),
                ("expert_tensor_parallel_size", job.layout.expert_tp),
                ("num_experts", arch.num_experts),
                ("moe_ffn_hidden_size", arch.moe_ffn_hidden_size),
                ("moe_grouped_gemm", job.grouped_gemm),
                ("moe_shared_expert_intermediate_size", arch.shared_expert_ffn_hidden_size or None),
                ("moe_shared_expert_gate", arch.moe_shared_expert_gate),
            ]
            # megatron-LM's moe_layer_freq: an int k (MoE on every k-th layer) or a 0/1 list.
            freq = getattr(args, "moe_layer_freq", None)
            if freq is not None:
                pattern = list(arch.moe_layers or (1,) * arch.num_layers)
                if isinstance(freq, int):
                    freq = [1 if i % freq == 0 else 0 for i in range(arch.num_layers)]
                if list(freq) != pattern:
                    raise CheckFailure(
                        f"{name}: args.moe_layer_freq={args.moe_layer_freq!r}, HF config means {pattern}"
                    )
        if arch.mla:
            # megatron-LM's argument names (--q-lora-rank, --qk-head-dim, --mtp-num-layers...).
            expected_args += [
                ("multi_latent_attention", True),
                ("q_lora_rank", arch.q_lora_rank),
                ("kv_lora_rank", arch.kv_lora_rank),
                ("qk_head_dim", arch.qk_nope_head_dim),
                ("qk_pos_emb_head_dim", arch.qk_rope_head_dim),
                ("v_head_dim", arch.v_head_dim),
                ("mtp_num_layers", arch.mtp_layers or None),
                ("moe_router_enable_expert_bias", arch.moe_expert_bias),
                ("moe_router_score_function", arch.moe_score_function),
            ]
        # Like megatron-LM's check_checkpoint_args: an absent arg is not checked. None, 0 and
        # False all mean "off" (e.g. mtp_num_layers: megatron-LM's default is None).
        for field, want in expected_args:
            have = getattr(args, field, want)
            if have != want and (have or want):
                raise CheckFailure(f"{name}: args.{field}={have}, expected {want}")
        return ckpt

    def open_torch_dist(self, job: CheckJob) -> dict[str, Any]:
        """The tracker, metadata.json and common.pt of a torch_dist checkpoint (its args say
        the padded vocabulary); the tensors are read by ``load_torch_dist``."""
        import torch

        tracker = Path(job.mcore_dir, TRACKER_FILE)
        if not tracker.is_file() or tracker.read_text().strip() != RELEASE_DIR:
            raise CheckFailure(f"{tracker}: missing or not 'release'")
        root = Path(job.mcore_dir, RELEASE_DIR)
        meta = json.loads((root / "metadata.json").read_text())
        if meta.get("sharded_backend") != "torch_dist":
            raise CheckFailure(f"{root}/metadata.json: {meta}")
        torch.serialization.add_safe_globals([argparse.Namespace])
        common = torch.load(root / "common.pt", map_location="cpu", weights_only=True)
        if common.get("checkpoint_version") != 3.0 or not isinstance(common.get("args"), argparse.Namespace):
            raise CheckFailure(f"{root}/common.pt: checkpoint_version {common.get('checkpoint_version')!r}, "
                               f"args {type(common.get('args')).__name__}")
        return common

    @staticmethod
    def load_torch_dist(job: CheckJob, sharded: dict[str, Any], chunks: Sequence[Any]) -> None:
        """megatron-core's own loader, at this job's layout: every key the model asks for must be
        in the checkpoint and every checkpoint key asked for by some rank (RAISE_ALL); then a
        strict ``load_state_dict`` of what it returned."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.validation import StrictHandling

        names = _model_entry_names(job.layout.vpp)
        loaded = dist_checkpointing.load(sharded, str(Path(job.mcore_dir, RELEASE_DIR)),
                                         strict=StrictHandling.RAISE_ALL)
        for chunk, (name, model) in enumerate(zip(names, chunks)):
            _strict_load(model, loaded[name], label=f"{name} (chunk {chunk})")

    @staticmethod
    def save_torch_dist(job: CheckJob, chunks: Sequence[Any]) -> None:
        """``dist_checkpointing.save`` of the loaded chunks as a release checkpoint (no args:
        the converter reads such a checkpoint with --hf_config_path)."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        assert job.save_torch_dist is not None
        root = Path(job.save_torch_dist, RELEASE_DIR)
        if dist.get_rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            Path(job.save_torch_dist, TRACKER_FILE).write_text(RELEASE_DIR)
        dist.barrier()
        state = _sharded_state_dicts(job, chunks)
        if job.save_optimizer:
            state["optimizer"] = _stepped_optimizer_state(chunks, state)
        state.update(checkpoint_version=3.0, iteration=0)
        dist_checkpointing.save(state, str(root))

    # ----- model building -----

    def transformer_config(self, job: CheckJob, arch: HFArch) -> Any:
        import torch
        import torch.nn.functional as F
        from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

        layout = job.layout
        if layout.num_layers != arch.num_layers:
            raise CheckFailure(f"layout has {layout.num_layers} layers, HF config has {arch.num_layers}")
        pipeline_layout = None
        if layout.pp > 1:
            # megatron's custom layout: one list per virtual stage, in virtual-stage order
            # (index = vpp_rank*pp + pp_rank); the embedding opens the first stage and the
            # loss closes the last one. It supports any per-stage count, which
            # num_layers_in_first/last_pipeline_stage cannot express (e.g. [1,3,1]).
            pipeline_layout = [["decoder"] * n for n in layout.layers_per_vstage]
            pipeline_layout[0].insert(0, "embedding")
            # MTP layers follow the decoder on the last (virtual) stage, before the loss.
            pipeline_layout[-1].extend(["mtp"] * arch.mtp_layers + ["loss"])
        config_class = MLATransformerConfig if arch.mla else TransformerConfig
        mla = self.mla_config(arch) if arch.mla else {}
        return config_class(
            **self.moe_config(job, arch),
            **mla,
            **self.gpt_oss_config(arch),
            **_linear_attention_config(arch),
            num_layers=arch.num_layers,
            hidden_size=arch.hidden_size,
            ffn_hidden_size=arch.ffn_hidden_size,
            num_attention_heads=arch.num_heads,
            num_query_groups=arch.num_kv_heads,
            kv_channels=arch.head_dim,
            layernorm_epsilon=arch.norm_eps,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu if arch.swiglu_limit is None else _quick_gelu(),
            add_bias_linear=arch.linear_bias,
            add_qkv_bias=arch.qkv_bias,
            qk_layernorm=arch.qk_norm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            pipeline_model_parallel_layout=pipeline_layout,
            mtp_num_layers=arch.mtp_layers or None,
            params_dtype=torch.float32,
            pipeline_dtype=torch.float32,
            use_cpu_initialization=True,
            perform_initialization=False,
        )

    @staticmethod
    def gpt_oss_config(arch: HFArch) -> dict[str, Any]:
        """GPT-OSS: HF's ``(clamp(up, ±limit) + 1) * g * sigmoid(1.702 g)`` with g = min(gate, limit)
        is megatron's GLU with quick_gelu, glu_linear_offset 1 and activation_func_clamp_value; the
        sinks are the learnable softmax offset; HF's window keeps keys q - k < sliding_window,
        megatron's (left, 0) keeps q - k <= left, so left = sliding_window - 1."""
        out: dict[str, Any] = {}
        if arch.swiglu_limit is not None:
            out.update(glu_linear_offset=1.0, activation_func_clamp_value=arch.swiglu_limit,
                       bias_activation_fusion=False)
        if arch.attention_sinks:
            out["softmax_type"] = "learnable"
        if arch.sliding_window and any(arch.window_layers):
            out.update(window_size=(arch.sliding_window - 1, 0), window_attn_skip_freq=list(arch.window_layers))
        return out

    @staticmethod
    def mla_config(arch: HFArch) -> dict[str, Any]:
        """MLATransformerConfig fields that make megatron's MLA compute what transformers does.

        * ``qk_head_dim`` is HF's qk_nope_head_dim (megatron's q head is qk_head_dim +
          qk_pos_emb_head_dim = HF's qk_head_dim).
        * ``rope_type="rope"``: MLATransformerConfig defaults to "yarn"; plain rope is HF's
          "default" rope_type (check_logits refuses other HF rope types).
        * ``rotary_interleaved`` stays False (megatron rejects it with MLA): with
          ``multi_latent_attention`` megatron's rope first de-interleaves the rope dims
          (``x[0::2] ++ x[1::2]``, rope_utils._apply_rotary_pos_emb_bshd) and then rotates
          halves, which is exactly HF's ``rope_interleave=True`` path (V3) and, up to one
          permutation shared by q and k, HF V2's complex-pair rope: same attention scores.
        * softmax scale = mscale**2 / sqrt(q_head_dim) with mscale = yarn_get_mscale(
          rotary_scaling_factor, mscale_all_dim) = 1 for rotary_scaling_factor=1 (set here so
          the yarn default of 40 cannot leak in), which is HF's qk_head_dim**-0.5.
        * ``qk_layernorm=True`` (set by the caller) builds q_layernorm / kv_layernorm, HF's
          q_a_layernorm / kv_a_layernorm, with the model's rms_norm_eps.
        """
        return {
            "multi_latent_attention": True,
            "q_lora_rank": arch.q_lora_rank,
            "kv_lora_rank": arch.kv_lora_rank,
            "qk_head_dim": arch.qk_nope_head_dim,
            "qk_pos_emb_head_dim": arch.qk_rope_head_dim,
            "v_head_dim": arch.v_head_dim,
            "rope_type": "rope",
            "rotary_base": arch.rope_theta,
            "rotary_percent": 1.0,
            "rotary_scaling_factor": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.0,
            "rotary_interleaved": False,
            "apply_rope_fusion": False,
        }

    @staticmethod
    def moe_config(job: CheckJob, arch: HFArch) -> dict[str, Any]:
        """TransformerConfig fields for routed experts that route exactly like transformers."""
        if not arch.num_experts:
            return {}
        common = {
            "num_moe_experts": arch.num_experts,
            "moe_ffn_hidden_size": arch.moe_ffn_hidden_size,
            "moe_router_topk": arch.moe_topk,
            "moe_router_dtype": "fp32",
            "moe_router_load_balancing_type": "none",
            "moe_aux_loss_coeff": 0.0,
            "moe_token_dispatcher_type": "allgather",  # W4: alltoall needs CUDA streams
            "moe_grouped_gemm": False,  # the local spec has no grouped GEMM without the grouped_gemm package
            "expert_model_parallel_size": job.layout.ep,
            "expert_tensor_parallel_size": job.layout.expert_tp,
        }
        if arch.moe_layers:
            common["moe_layer_freq"] = list(arch.moe_layers)  # e.g. DeepSeek's first_k_dense_replace
        if arch.shared_expert_ffn_hidden_size:
            # MoELayer adds the shared experts' output to the routed output. Ungated, that is
            # HF's DeepSeek MoE; moe_shared_expert_gate gives SharedExpertMLP a gate_weight
            # [1, hidden] and scales its output by sigmoid(x @ gate_weight.T) (x: the pre-MLP
            # norm's output, as for the router), which is Qwen2MoeSparseMoeBlock's
            # sigmoid(shared_expert_gate(x)) * shared_expert(x).
            common["moe_shared_expert_intermediate_size"] = arch.shared_expert_ffn_hidden_size
            common["moe_shared_expert_gate"] = arch.moe_shared_expert_gate
            common["moe_shared_expert_overlap"] = False
        if arch.moe_num_groups:
            # Megatron ranks a group by the sum of its top (topk // group_topk) scores;
            # check_logits refuses configs where HF sums a different number.
            common["moe_router_num_groups"] = arch.moe_num_groups
            common["moe_router_group_topk"] = arch.moe_group_topk
        if arch.moe_score_function == "sigmoid":
            # DeepSeek-V3 (noaux_tc): sigmoid scores; top-k picked on scores + expert_bias but
            # weighted by the unbiased scores, renormalized (megatron always does for top-k > 1;
            # HF if norm_topk_prob, else check_logits refuses) and times routed_scaling_factor.
            return {
                **common,
                "moe_router_score_function": "sigmoid",
                "moe_router_enable_expert_bias": arch.moe_expert_bias,
                "moe_router_topk_scaling_factor": arch.moe_scaling_factor,
                "moe_router_pre_softmax": False,  # unused by the sigmoid path
            }
        # HF: p = softmax(all router logits) in fp32, keep the top-k, renormalize them if
        # moe_renormalize. Megatron with pre_softmax=True takes the top-k of the full
        # softmax unscaled (= HF without renormalization); with pre_softmax=False it takes
        # softmax over the top-k logits, which equals the renormalized top-k of the full
        # softmax. Megatron refuses pre_softmax=False for top-1 (check_logits reports it).
        # DeepSeek-V2 (greedy, never renormalized) then scales by routed_scaling_factor.
        pre_softmax = not arch.moe_renormalize or arch.moe_topk == 1
        scaling = arch.moe_scaling_factor if arch.moe_scaling_factor not in (None, 1.0) else None
        return {
            **common,
            "moe_router_score_function": "softmax",
            "moe_router_pre_softmax": pre_softmax,
            "moe_router_topk_scaling_factor": scaling,
        }

    def layer_spec(self, arch: HFArch) -> Any:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(
            num_experts=arch.num_experts or None,
            moe_grouped_gemm=False,
            qk_layernorm=arch.qk_norm,
            normalization="RMSNorm",
        )
        if arch.full_width_qk_norm:
            # W10: megatron-core has only per-head q/k norms; MiniMax-M2's norm each whole
            # projection. A stand-in module holds the whole weight (as the rank files do) and
            # normalizes over all heads, summing squares over TP.
            attention = spec.submodules.self_attention.submodules
            attention.q_layernorm, attention.k_layernorm = _full_width_norm_classes()
        return spec

    @staticmethod
    def block_spec(config: Any, vp_stage: int | None, pp_rank: int, mla: bool) -> Any:
        """Local-spec decoder block of one (virtual) stage: dense / MoE layers per
        ``config.moe_layer_freq``; with MLA, W6 applied to every layer spec."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
        )
        if not mla:
            return block
        sdpa = _sdpa_core_attention_class()
        for layer_spec in block.layer_specs:
            # W6: the local DotProductAttention takes no k_channels / v_channels (MLA's q/k
            # head dim differs from v's); a parameter-free SDPA keeps the state dict unchanged.
            layer_spec.submodules.self_attention.submodules.core_attention = sdpa
        return block

    def build_chunks(self, job: CheckJob, arch: HFArch, padded_vocab_size: int) -> list[Any]:
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel

        layout = job.layout
        config = self.transformer_config(job, arch)
        pp_rank = ps.get_pipeline_model_parallel_rank()
        chunks = []
        for chunk in range(layout.vpp):
            vp_stage = chunk if layout.vpp > 1 else None
            mtp_spec = None
            if arch.linear_attention:
                spec = _hybrid_block_spec(config, arch, vp_stage, pp_rank)
                if arch.mtp_layers:
                    mtp_spec = _hybrid_mtp_block_spec(config, spec, arch, vp_stage, pp_rank)
            elif arch.mla or arch.moe_layers:
                spec = self.block_spec(config, vp_stage, pp_rank, mla=arch.mla)
                if arch.mtp_layers:
                    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

                    # None except on the last (virtual) stage; the MTP layer reuses the spec of
                    # the stage's last decoder layer (W6 already applied to it).
                    mtp_spec = get_gpt_mtp_block_spec(
                        config, spec, use_transformer_engine=False, vp_stage=vp_stage, pp_rank=pp_rank
                    )
            else:
                spec = self.layer_spec(arch)
            model = GPTModel(
                config=config,
                transformer_layer_spec=spec,
                mtp_block_spec=mtp_spec,
                vocab_size=padded_vocab_size,
                max_sequence_length=arch.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=True,
                share_embeddings_and_output_weights=job.tied,
                position_embedding_type="rope",
                rotary_base=arch.rope_theta,
                rotary_percent=arch.rotary_percent,
                vp_stage=vp_stage,
            )
            model.eval()  # W5; also disables dropout
            self.verify_chunk_structure(model, layout, layout.vstage(pp_rank, chunk), arch.mtp_layers)
            chunks.append(model)
        return chunks

    @staticmethod
    def verify_chunk_structure(model: Any, layout: Layout, vstage: int, mtp_layers: int = 0) -> None:
        """The built chunk must hold exactly the layers the layout assigns to ``vstage``
        (and the ``mtp_layers`` MTP layers if it is the last virtual stage)."""
        want = layout.layers_per_vstage[vstage]
        offset = layout.layer_offset(vstage)
        layers = list(model.decoder.layers)
        # TransformerLayer.layer_number is the 1-based *global* layer index.
        numbers = [layer.layer_number for layer in layers]
        expected_numbers = list(range(offset + 1, offset + want + 1))
        if numbers != expected_numbers:
            raise CheckFailure(
                f"megatron built virtual stage {vstage} with layers {numbers},"
                f" layout expects {expected_numbers}"
            )
        first, last = vstage == 0, vstage == layout.num_vstages - 1
        if (model.pre_process, model.post_process) != (first, last):
            raise CheckFailure(
                f"virtual stage {vstage}: megatron pre/post_process={model.pre_process}/{model.post_process},"
                f" layout expects {first}/{last}"
            )
        built_mtp = len(model.mtp.layers) if getattr(model, "mtp_process", False) else 0
        want_mtp = mtp_layers if last else 0
        if built_mtp != want_mtp:
            raise CheckFailure(
                f"virtual stage {vstage}: megatron built {built_mtp} MTP layers, expected {want_mtp}"
            )

    @staticmethod
    def te_keys_maps(model: Any, spec: Any) -> tuple[dict[str, str], dict[int | str, dict[str, str]]]:
        """megatron-core's own local->TE layer key map: the spec's, and per built layer.

        An entry is kept for a layer only where the layer has the module TE fuses the norm
        into: the local spec declares ``"pre_mlp_layernorm." -> "mlp.linear_fc1.layer_norm_"``
        for MoE layers too, but TE's MoE layer keeps a separate ``pre_mlp_layernorm``
        (there is no ``mlp.linear_fc1``), so that entry does not apply there.
        """
        spec_map = dict(spec.submodules.sharded_state_dict_keys_map)
        per_layer: dict[int | str, dict[str, str]] = {}
        layers: list[tuple[int | str, Any]] = list(enumerate(model.decoder.layers))
        if getattr(model, "mtp_process", False):  # MTP transformer layers (GLM-4.5), by key prefix
            for index, mtp_layer in enumerate(model.mtp.layers):
                for name in ("transformer_layer", "mtp_model_layer"):
                    if hasattr(mtp_layer, name):
                        layers.append((f"mtp.layers.{index}.{name}.", getattr(mtp_layer, name)))
        for where, layer in layers:
            per_layer[where] = {
                local: te
                for local, te in layer.submodules_config.sharded_state_dict_keys_map.items()
                if _has_submodule(layer, te.rsplit(".", 1)[0])
            }
        return spec_map, per_layer

    # ----- loading -----

    @staticmethod
    def mla_te_keys_maps(model: Any) -> dict[int | str, dict[str, str]]:
        """``MLA_TE_KEYS_MAP`` per built decoder layer (by local index) and per MTP transformer
        layer (by key prefix), kept only where the layer has the module TE fuses the norm into
        (no linear_q_up_proj without q-LoRA; no mlp.linear_fc1 in MoE layers)."""
        layers: list[tuple[int | str, Any]] = list(enumerate(model.decoder.layers))
        if getattr(model, "mtp_process", False):
            for index, mtp_layer in enumerate(model.mtp.layers):
                for name in ("transformer_layer", "mtp_model_layer"):
                    if hasattr(mtp_layer, name):
                        layers.append((f"mtp.layers.{index}.{name}.", getattr(mtp_layer, name)))
        return {
            where: {
                local: te
                for local, te in MLA_TE_KEYS_MAP.items()
                if _has_submodule(layer, te.rsplit(".", 1)[0]) and _has_submodule(layer, local.rstrip("."))
            }
            for where, layer in layers
        }

    def load_chunks(
        self, job: CheckJob, arch: HFArch, ckpt: Mapping[str, Any], chunks: Sequence[Any]
    ) -> int:
        """Strict-load every chunk; returns how many keys were renamed to local-spec names.

        For TE-named MLA checkpoints the replicated down projections are also sliced to this
        TP rank's local-spec shard; their full copies are kept in ``self.duplicated`` for
        ``check_duplicated_copies``.
        """
        from megatron.core import parallel_state as ps

        names = _model_entry_names(job.layout.vpp)
        renamed = 0
        for chunk, (entry, model) in enumerate(zip(names, chunks)):
            state_dict = ckpt[entry]
            if not isinstance(state_dict, Mapping):
                raise CheckFailure(f"{entry} is {type(state_dict).__name__}, expected a state dict")
            original = set(state_dict)
            try:
                if job.grouped_gemm:
                    state_dict = rename_grouped_experts_to_local(state_dict)
                if job.te_names and arch.mla:
                    state_dict = rename_te_to_local(state_dict, {}, self.mla_te_keys_maps(model))
                    full: dict[str, Any]
                    state_dict, full = split_duplicated_to_tp(
                        state_dict, job.layout.tp, ps.get_tensor_model_parallel_rank()
                    )
                    self.check_duplicated_shapes(model, full, job.layout.tp, entry)
                    self.duplicated.extend(sorted(full.items()))
                elif job.te_names:
                    keys_map, layer_maps = self.te_keys_maps(model, self.layer_spec(arch))
                    state_dict = rename_te_to_local(state_dict, keys_map, layer_maps)
            except KeyError as exc:
                raise CheckFailure(f"{entry}: {exc.args[0]}") from None
            renamed += len(original - set(state_dict))
            _strict_load(model, state_dict, label=f"{entry} (chunk {chunk})")
        return renamed

    @staticmethod
    def check_duplicated_shapes(model: Any, full: Mapping[str, Any], tp: int, entry: str) -> None:
        """A TE-spec down projection must be the full weight: TP times the local shard's rows."""
        expected = model.state_dict()
        bad = []
        for key, value in full.items():
            if key not in expected:
                continue  # strict load reports it
            want = (expected[key].shape[0] * tp, *expected[key].shape[1:])
            if tuple(value.shape) != want:
                bad.append(f"{key}: file {tuple(value.shape)} vs full {want}")
        if bad:
            raise CheckFailure(f"{entry}: TE spec keeps MLA down projections whole on every TP rank: {bad}")

    def check_duplicated_copies(self) -> None:
        """Every TP rank must hold the same copy of each TE-duplicated weight (TP rank 0's).

        A collective over the TP group: run on every rank, only after every rank loaded (the
        key lists then agree within a TP group, which shares one pipeline stage).
        """
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return
        src = dist.get_process_group_ranks(group)[0]
        differ = []
        for key, value in self.duplicated:
            reference = value.detach().clone().contiguous()
            dist.broadcast(reference, src=src, group=group)
            if not torch.equal(reference, value):
                differ.append(key)
        if differ:
            raise CheckFailure(f"TE-duplicated weights differ from TP rank 0's copy: {differ}")

    # ----- logits -----

    def check_logits(
        self, job: CheckJob, arch: HFArch, chunks: Sequence[Any]
    ) -> tuple[float | None, float | None, float | None]:
        """Pipelined fp32 forward; the last stage compares with transformers.

        Returns (max|diff|, max|logit|, MTP max|diff|) on the rank that compared, Nones
        elsewhere; the MTP entry is None without MTP layers (see ``_hf_mtp_logits`` for
        the reference of MTP logits, which transformers does not compute itself).
        """
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if arch.rope_type != "default":
            raise CheckFailure(f"logits check supports only default rope, config has {arch.rope_type!r}")
        if arch.num_experts and arch.moe_topk == 1 and arch.moe_renormalize:
            # HF weighs the single expert by 1.0; megatron 0.16 requires pre-softmax for
            # top-1 and then weighs it by its softmax probability.
            raise CheckFailure("logits check: top-1 routing with renormalization has no megatron equivalent")
        if arch.moe_score_function == "sigmoid" and arch.moe_topk > 1 and not arch.moe_renormalize:
            # megatron's sigmoid router always divides the top-k scores by their sum.
            raise CheckFailure(
                "logits check: sigmoid routing without norm_topk_prob has no megatron equivalent"
            )
        if arch.moe_group_topk and arch.moe_group_score_topn != arch.moe_topk // arch.moe_group_topk:
            raise CheckFailure(
                f"logits check: HF ranks expert groups by their top-{arch.moe_group_score_topn} scores,"
                f" megatron by their top-{arch.moe_topk // arch.moe_group_topk} (topk // group_topk)"
            )
        if arch.mla and not arch.rope_interleave:
            # megatron's MLA rope always de-interleaves the rope dims first (see mla_config).
            raise CheckFailure("logits check: MLA with rope_interleave=False has no megatron equivalent")
        layout = job.layout
        input_ids = _logits_input_ids(arch.vocab_size)
        batch, seq = input_ids.shape
        position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
        # W3: megatron's default causal mask is built on "cuda"; True means "masked".
        attention_mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]

        pp_rank = ps.get_pipeline_model_parallel_rank()
        pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        # Interleaved order: stage p+s*pp follows p-1 (chunk s), and p=0 follows the last
        # rank's chunk s-1, so the neighbors form a ring.
        prev_rank = pp_ranks[(pp_rank - 1) % layout.pp]
        next_rank = pp_ranks[(pp_rank + 1) % layout.pp]
        logits = None
        mtp_logits: list[Any] = []
        with torch.no_grad():
            for chunk, model in enumerate(chunks):
                vstage = layout.vstage(pp_rank, chunk)
                last = vstage == layout.num_vstages - 1
                if vstage > 0:
                    hidden = torch.empty(seq, batch, arch.hidden_size, dtype=torch.float32)
                    dist.recv(hidden, src=prev_rank)
                    model.set_input_tensor(hidden)
                if last and arch.mtp_layers:
                    logits, mtp_logits = self.forward_with_mtp(
                        model, arch, input_ids, position_ids, attention_mask
                    )
                    continue
                output = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
                if not last:
                    dist.send(output.contiguous(), dst=next_rank)
                else:
                    logits = output

        if logits is None:
            return None, None, None

        def gather_vocab(part: Any) -> Any:
            # Vocab-parallel logits [b, s, V/tp] -> full padded vocab on every TP rank.
            parts = [torch.empty_like(part) for _ in range(layout.tp)]
            dist.all_gather(parts, part.contiguous(), group=ps.get_tensor_model_parallel_group())
            return torch.cat(parts, dim=-1)

        full = gather_vocab(logits)
        full_mtp = [gather_vocab(part) for part in mtp_logits]
        # One comparison per job is enough; replicas and other TP ranks skip the HF load.
        if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
            return None, None, None
        reference = _hf_logits(job.hf_dir, input_ids)
        if full.shape[:2] != reference.shape[:2] or full.shape[-1] < arch.vocab_size:
            raise CheckFailure(
                f"megatron logits {tuple(full.shape)} vs transformers {tuple(reference.shape)}"
            )
        # Padded vocab rows are not part of the model: compare real columns only.
        diff = (full[..., : arch.vocab_size] - reference).abs().max().item()
        mtp_diff = None
        if arch.mtp_layers and arch.linear_attention:
            with tempfile.TemporaryDirectory(prefix="qwen3_next_mtp_") as ref_dir:
                _qwen3_next_mtp_as_decoder_layer(job.hf_dir, ref_dir, arch)
                mtp_reference = _hf_mtp_logits(ref_dir, input_ids, arch.num_layers, arch.mtp_layers)
        elif arch.mtp_layers:
            mtp_reference = _hf_mtp_logits(job.hf_dir, input_ids, arch.num_layers, arch.mtp_layers)
        if arch.mtp_layers:
            mtp_diff = max(
                float((ours[..., : arch.vocab_size] - ref).abs().max().item())
                for ours, ref in zip(full_mtp, mtp_reference)
            )
        return float(diff), float(reference.abs().max().item()), mtp_diff

    @staticmethod
    def forward_with_mtp(
        model: Any, arch: HFArch, input_ids: Any, position_ids: Any, attention_mask: Any
    ) -> tuple[Any, list[Any]]:
        """Last-stage forward of a model with MTP layers: (main logits, [MTP k logits]), each
        [b, s, V/tp].

        With ``mtp_num_layers`` set, GPTModel's post-processing runs the MTP block and needs
        labels (it returns the loss then, not logits). The output layer is called once per
        MTP layer (in order) and then once for the main hidden states, so the last call is
        the main model's logits. The hook clones: megatron's vocab-parallel cross entropy
        then modifies the logits in place.
        """
        calls: list[Any] = []
        hook = model.output_layer.register_forward_hook(
            lambda _module, _args, out: calls.append(out[0].clone())
        )
        try:
            model(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, labels=input_ids
            )
        finally:
            hook.remove()
        if len(calls) != 1 + arch.mtp_layers:
            raise CheckFailure(
                f"output layer ran {len(calls)} times, expected 1 + {arch.mtp_layers} MTP layers"
            )
        # [s, b, V/tp] -> [b, s, V/tp]
        return calls[-1].transpose(0, 1), [call.transpose(0, 1) for call in calls[:-1]]


_SDPA_CLASS: Any = None
_FULL_WIDTH_NORMS: Any = None


def _linear_attention_config(arch: HFArch) -> dict[str, Any]:
    """TransformerConfig fields of a Qwen3-Next / Qwen3.5 hybrid (megatron's gated delta-net)."""
    if not arch.linear_attention:
        return {}
    return {
        "experimental_attention_variant": "gated_delta_net",
        "linear_attention_freq": list(arch.linear_attention),
        "linear_num_key_heads": arch.linear_num_key_heads,
        "linear_num_value_heads": arch.linear_num_value_heads,
        "linear_key_head_dim": arch.linear_key_head_dim,
        "linear_value_head_dim": arch.linear_value_head_dim,
        "linear_conv_kernel_dim": arch.linear_conv_kernel_dim,
        "attention_output_gate": arch.attention_output_gate,
        "layernorm_zero_centered_gamma": arch.zero_centered_norm,
        # WQ2: GatedDeltaNet's torch path (torch_chunk_gated_delta_rule, nn.Conv1d) instead of FLA's
        # Triton kernels, which cannot run on CPU.
        "deterministic_mode": True,
    }


def _hybrid_block_spec(config: Any, arch: HFArch, vp_stage: int | None, pp_rank: int) -> Any:
    """Decoder block of one (virtual) stage of a Qwen3-Next / Qwen3.5 hybrid, built the way
    megatron's get_transformer_block_with_experimental_attention_variant_spec does (a layer spec
    per layer: GatedDeltaNet where linear_attention_freq says 1, else gated self-attention; MoE
    where moe_layer_freq says 1) but from local modules: megatron-core 0.16 builds that block
    only with TE. The GDN's in_proj is a ColumnParallelLinear with the input norm before it (TE
    fuses it as in_proj.layer_norm_weight: the layer's key map says so), out_proj a
    RowParallelLinear. WQ1: the norms are a zero-centered RMSNorm stand-in (torch's wrapped
    norm refuses layernorm_zero_centered_gamma; TE's computes the same x * (1 + weight)).
    WQ2: FLA's l2norm is replaced by its formula, the compiled gated norm by its plain function."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.ssm import gated_delta_net as gdn
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    _patch_gated_delta_net(gdn)
    norm = _zero_centered_norm_class() if arch.zero_centered_norm else None
    layer_specs = []
    for layer in range(arch.num_layers):
        moe = bool(arch.num_experts) and (not arch.moe_layers or bool(arch.moe_layers[layer]))
        spec = get_gpt_layer_local_spec(num_experts=arch.num_experts if moe else None, moe_grouped_gemm=False,
                                        qk_layernorm=arch.qk_norm, normalization="RMSNorm")
        sub = spec.submodules
        if norm is not None:
            sub.input_layernorm = sub.pre_mlp_layernorm = norm
            sub.self_attention.submodules.q_layernorm = sub.self_attention.submodules.k_layernorm = norm
        if arch.linear_attention[layer]:
            sub.self_attention = ModuleSpec(
                module=gdn.GatedDeltaNet,
                submodules=gdn.GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=norm or sub.input_layernorm,
                                                       out_proj=RowParallelLinear),
            )
        # The keys of megatron's TE block: each input norm fused into the linear after it
        # (in_proj or linear_qkv), the pre-MLP norm into a dense fc1; MoE layers keep theirs.
        fused = "self_attention.in_proj.layer_norm_" if arch.linear_attention[layer] else "self_attention.linear_qkv.layer_norm_"
        sub.sharded_state_dict_keys_map = {"input_layernorm.": fused,
                                           **({} if moe else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})}
        layer_specs.append(spec)
    if config.pipeline_model_parallel_layout is not None:
        local = config.pipeline_model_parallel_layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local = range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank))
    final_norm = norm or layer_specs[0].submodules.pre_mlp_layernorm
    return TransformerBlockSubmodules(layer_specs=[layer_specs[i] for i in local], layer_norm=final_norm)


def _hybrid_mtp_block_spec(config: Any, block: Any, arch: HFArch, vp_stage: int | None, pp_rank: int) -> Any:
    """megatron's local MTP block spec over the stage's last layer spec (None off the last
    stage), its enorm / hnorm / final norm the zero-centered stand-in (WQ1)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    mtp = get_gpt_mtp_block_spec(config, block, use_transformer_engine=False, vp_stage=vp_stage, pp_rank=pp_rank)
    if mtp is not None and arch.zero_centered_norm:
        norm = _zero_centered_norm_class()
        for layer_spec in mtp.layer_specs:
            layer_spec.submodules.enorm = layer_spec.submodules.hnorm = layer_spec.submodules.layer_norm = norm
    return mtp


def _patch_gated_delta_net(gdn: Any) -> None:
    """WQ2 (see _hybrid_block_spec)."""
    import torch

    def l2norm(x: Any, dim: int = -1, eps: float = 1e-6) -> Any:  # FLA's l2norm: x / sqrt(sum(x^2) + eps)
        return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)

    gdn.HAVE_FLA = True
    gdn.l2norm = l2norm
    fused = gdn.GatedDeltaNet._apply_gated_norm
    gdn.GatedDeltaNet._apply_gated_norm = getattr(fused, "_torchdynamo_orig_callable", fused)


_ZERO_CENTERED_NORM: Any = None


def _zero_centered_norm_class() -> Any:
    """WQ1: RMSNorm with megatron's layernorm_zero_centered_gamma (x * (1 + weight), weight
    initialised to 0), computed in fp32 like Qwen3-Next's HF norm."""
    global _ZERO_CENTERED_NORM
    if _ZERO_CENTERED_NORM is not None:
        return _ZERO_CENTERED_NORM
    import torch

    class _ZeroCenteredRMSNorm(torch.nn.Module):
        def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
            super().__init__()
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.zeros(hidden_size))

        def forward(self, x: Any) -> Any:
            out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (out * (1.0 + self.weight.float())).to(x.dtype)

    _ZERO_CENTERED_NORM = _ZeroCenteredRMSNorm
    return _ZERO_CENTERED_NORM


def _full_width_norm_classes() -> tuple[Any, Any]:
    """W10: RMSNorms over a whole q (heads x head_dim) or k (groups x head_dim) projection, as
    MiniMax-M2 applies them, for megatron's q_layernorm / k_layernorm slots (which see
    ``[s, b, local heads, head_dim]``). The weight is the full projection's, replicated over TP;
    each rank uses its heads' slice and the sum of squares is all-reduced over TP."""
    global _FULL_WIDTH_NORMS
    if _FULL_WIDTH_NORMS is not None:
        return _FULL_WIDTH_NORMS
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    class _FullWidthNorm(torch.nn.Module):
        heads_attr = ""

        def __init__(self, hidden_size: int, config: Any, eps: float = 1e-6) -> None:
            super().__init__()
            self.heads = int(getattr(config, self.heads_attr))
            self.head_dim = hidden_size
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.ones(self.heads * hidden_size))

        def forward(self, x: Any) -> Any:
            local = x.float()
            squares = local.pow(2).sum(dim=(-2, -1), keepdim=True)
            tp = ps.get_tensor_model_parallel_world_size()
            if tp > 1:
                dist.all_reduce(squares, group=ps.get_tensor_model_parallel_group())
            normed = local * torch.rsqrt(squares / (self.heads * self.head_dim) + self.eps)
            n_local = x.shape[-2]
            rank = ps.get_tensor_model_parallel_rank()
            weight = self.weight.view(self.heads, self.head_dim)[rank * n_local:(rank + 1) * n_local]
            return weight * normed.to(x.dtype)

    class _FullWidthQNorm(_FullWidthNorm):
        heads_attr = "num_attention_heads"

    class _FullWidthKNorm(_FullWidthNorm):
        heads_attr = "num_query_groups"

    _FULL_WIDTH_NORMS = (_FullWidthQNorm, _FullWidthKNorm)
    return _FULL_WIDTH_NORMS


def _sdpa_core_attention_class() -> Any:
    """W6: a parameter-free core attention for MLA on the local spec (built once, lazily).

    MLASelfAttention builds its core attention with ``k_channels`` / ``v_channels`` (q/k
    heads are qk_head_dim + qk_pos_emb_head_dim wide, v heads v_head_dim), which only TE's
    attention accepts. This module takes megatron's constructor arguments, holds no
    parameters or buffers (so the layer's state dict is unchanged) and computes
    softmax(q k^T * softmax_scale + causal mask) v with torch's SDPA in fp32.
    """
    global _SDPA_CLASS
    if _SDPA_CLASS is None:
        import torch
        import torch.nn.functional as F

        class SDPACoreAttention(torch.nn.Module):
            def __init__(
                self,
                config: Any,
                layer_number: int,
                attn_mask_type: Any,
                attention_type: str = "self",
                softmax_scale: float | None = None,
                **_: Any,
            ) -> None:
                super().__init__()
                self.softmax_scale = softmax_scale

            def forward(self, query: Any, key: Any, value: Any, attention_mask: Any, **_: Any) -> Any:
                # [s, b, n, d] -> [b, n, s, d]; attention_mask: True = masked (megatron's convention).
                q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
                seq_q, seq_k = q.shape[2], k.shape[2]
                if attention_mask is None:
                    attention_mask = torch.triu(torch.ones(seq_q, seq_k, dtype=torch.bool), diagonal=1)
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale
                )
                # [b, n, s, dv] -> [s, b, n*dv]
                return out.permute(2, 0, 1, 3).reshape(seq_q, q.shape[0], -1)

        _SDPA_CLASS = SDPACoreAttention
    return _SDPA_CLASS


def _has_submodule(module: Any, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _local_expert_indices(model: Any) -> list[int]:
    """Global indices of the routed experts megatron placed on this rank ([] if dense)."""
    for layer in model.decoder.layers:
        indices = getattr(layer.mlp, "local_expert_indices", None)
        if indices is not None:
            return [int(i) for i in indices]
    return []


def _sharded_state_dicts(job: CheckJob, chunks: Sequence[Any]) -> dict[str, Any]:
    """Each chunk's sharded state dict under its model entry (megatron-core 0.16's MTP stage
    without the embedding needs the metadata that holds the DP/CP group)."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    names = _model_entry_names(job.layout.vpp)
    return {name: model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))
            for name, model in zip(names, chunks)}


def _stepped_optimizer_state(chunks: Sequence[Any], model_state: Mapping[str, Any]) -> Any:
    """megatron-core's FP32Optimizer over the chunks' parameters (torch Adam), stepped once on
    made-up gradients, as its sharded state dict; the parameters are left as they were."""
    import torch
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer

    params = [p for model in chunks for p in model.parameters()]
    saved = [p.detach().clone() for p in params]
    adam = torch.optim.Adam(params, lr=1e-3)
    # FP32Optimizer.__init__ only adds a loss-scale tensor on CUDA, which sharded_state_dict never uses.
    optimizer = FP32Optimizer.__new__(FP32Optimizer)
    MegatronOptimizer.__init__(optimizer, adam, OptimizerConfig(optimizer="adam", lr=1e-3), lambda opt, config: None)
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    adam.step()
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    flat: dict[str, Any] = {}
    for entry in model_state.values():
        flat.update(entry)
    return optimizer.sharded_state_dict(flat)


def _model_entry_names(vpp: int) -> list[str]:
    return ["model"] if vpp == 1 else [f"model{i}" for i in range(vpp)]


def _padded_vocab_size(ckpt: Mapping[str, Any], arch: HFArch) -> int:
    padded = getattr(ckpt.get("args"), "padded_vocab_size", None)
    if not isinstance(padded, int) or padded < arch.vocab_size:
        raise CheckFailure(f"args.padded_vocab_size={padded!r} is not an int >= vocab_size {arch.vocab_size}")
    return padded


def _strict_load(model: Any, state_dict: Mapping[str, Any], label: str) -> None:
    """``load_state_dict(strict=True)`` with a named report of every mismatch first.

    ``_extra_state`` entries the model lacks (e.g. TE's core_attention) are dropped, and
    ones it has may be absent: megatron's legacy loader tolerates both and they carry no
    weights here. Everything else must match key for key and shape for shape.
    """
    import torch

    expected = model.state_dict()
    provided = {k: v for k, v in state_dict.items() if not (_is_extra_state(k) and k not in expected)}
    missing = sorted(k for k in expected if k not in provided and not _is_extra_state(k))
    unexpected = sorted(k for k in provided if k not in expected)
    bad_shapes = []
    for key, value in provided.items():
        if key not in expected or _is_extra_state(key):
            continue
        if not isinstance(value, torch.Tensor):
            bad_shapes.append(f"{key}: {type(value).__name__} instead of a tensor")
        elif value.shape != expected[key].shape:
            bad_shapes.append(f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key].shape)}")
    lines = []
    if missing:
        lines.append(f"missing keys {missing}")
    if unexpected:
        lines.append(f"unexpected keys {unexpected}")
    if bad_shapes:
        lines.append(f"shape mismatches {bad_shapes}")
    if lines:
        raise CheckFailure(f"{label}: " + "; ".join(lines))
    model.load_state_dict(provided, strict=True)


def _logits_input_ids(vocab_size: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(LOGITS_SEED)
    return torch.randint(0, vocab_size, (LOGITS_BATCH, LOGITS_SEQ), generator=generator)


def _hf_logits(hf_dir: str, input_ids: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _hf_tensors(hf_dir: str, names: Sequence[str]) -> dict[str, Any]:
    """The named tensors from an HF directory's safetensors files (sharded or not)."""
    from safetensors import safe_open

    index = Path(hf_dir, "model.safetensors.index.json")
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {}
        for file in sorted(Path(hf_dir).glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                weight_map.update(dict.fromkeys(handle.keys(), file.name))
    missing = [name for name in names if name not in weight_map]
    if missing:
        raise CheckFailure(f"MTP check: {hf_dir} lacks {missing}")
    out: dict[str, Any] = {}
    for name in names:
        with safe_open(str(Path(hf_dir, weight_map[name])), "pt") as handle:
            out[name] = handle.get_tensor(name).float()
    return out


def _hf_mtp_logits(hf_dir: str, input_ids: Any, num_layers: int, mtp_layers: int) -> list[Any]:
    """Reference logits of DeepSeek's MTP layers, computed with transformers' own modules.

    transformers has no MTP, but an MTP layer's decoder layer is stored as
    ``model.layers.{num_layers + k}``: loading the model with ``num_hidden_layers =
    num_layers + mtp_layers`` gives those layers with transformers' weight loading. MTP
    layer k then computes (DeepSeek-V3 paper; megatron's MultiTokenPredictionLayer)::

        ids_k = ids shifted left k+1 times (the vacated last position gets token 0)
        h_0   = model.norm(output of the last main layer)
        x     = eh_proj(cat(enorm(embed(ids_k)), hnorm(h_k)))      # embedding first
        h_k+1 = shared_head.norm(layer_{num_layers+k}(x))            # causal, positions 0..s-1
        logits_k = lm_head(h_k+1)

    implemented by replacing the input of layer ``num_layers + k`` with a forward pre-hook.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager", num_hidden_layers=num_layers + mtp_layers
    )
    model.eval()
    inner = model.model
    names = [
        f"model.layers.{num_layers + k}.{part}.weight"
        for k in range(mtp_layers)
        for part in ("enorm", "hnorm", "eh_proj", "shared_head.norm")
    ]
    weights = _hf_tensors(hf_dir, names)
    # (Qwen3-Next's RMSNorm names its epsilon ``eps``)
    norm_class, eps = type(inner.norm), getattr(inner.norm, "variance_epsilon", getattr(inner.norm, "eps", None))

    def norm(weight: Any) -> Any:
        module = norm_class(weight.shape[0], eps=eps)
        module.weight.data.copy_(weight)
        return module

    outputs: dict[int, Any] = {}
    shifted = [input_ids]
    for _ in range(mtp_layers):
        ids = torch.roll(shifted[-1], shifts=-1, dims=-1)
        ids[:, -1] = 0
        shifted.append(ids)
    hooks = []

    def keep_output(index: int) -> Any:
        return lambda _module, _args, out: outputs.__setitem__(index, out[0] if isinstance(out, tuple) else out)

    def mtp_input(k: int) -> Any:
        head = f"model.layers.{num_layers + k}."

        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            previous = outputs[num_layers + k - 1]
            if k == 0:
                previous = inner.norm(previous)
            else:
                previous = norm(weights[f"model.layers.{num_layers + k - 1}.shared_head.norm.weight"])(previous)
            embedded = norm(weights[head + "enorm.weight"])(inner.embed_tokens(shifted[k + 1]))
            mixed = torch.cat([embedded, norm(weights[head + "hnorm.weight"])(previous)], dim=-1)
            new_hidden = torch.nn.functional.linear(mixed, weights[head + "eh_proj.weight"])
            if args:
                return (new_hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new_hidden}

        return hook

    for index in range(num_layers - 1, num_layers + mtp_layers):
        hooks.append(inner.layers[index].register_forward_hook(keep_output(index)))
    for k in range(mtp_layers):
        hooks.append(inner.layers[num_layers + k].register_forward_pre_hook(mtp_input(k), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
            logits = []
            for k in range(mtp_layers):
                shared_norm = norm(weights[f"model.layers.{num_layers + k}.shared_head.norm.weight"])
                logits.append(model.lm_head(shared_norm(outputs[num_layers + k])))
            return logits
    finally:
        for hook in hooks:
            hook.remove()


def _qwen3_next_mtp_as_decoder_layer(hf_dir: str, out_dir: str, arch: HFArch) -> None:
    """Qwen3-Next's MTP head rewritten as ``_hf_mtp_logits`` reads DeepSeek's: ``mtp.layers.0.*``
    as decoder layer ``model.layers.{n}`` (a full-attention layer appended to ``layer_types``),
    ``mtp.fc`` / ``pre_fc_norm_embedding`` / ``pre_fc_norm_hidden`` / ``norm`` as that layer's
    ``eh_proj`` / ``enorm`` / ``hnorm`` / ``shared_head.norm``. The norms are transformers' own
    Qwen3-Next RMSNorm (x * (1 + w)), as for the model's other norms."""
    import torch
    from safetensors.torch import load_file, save_file

    if arch.mtp_layers != 1:
        raise CheckFailure(f"Qwen3-Next MTP reference for 1 layer, got {arch.mtp_layers}")
    n = arch.num_layers
    renames = {"mtp.fc.weight": f"model.layers.{n}.eh_proj.weight",
               "mtp.pre_fc_norm_embedding.weight": f"model.layers.{n}.enorm.weight",
               "mtp.pre_fc_norm_hidden.weight": f"model.layers.{n}.hnorm.weight",
               "mtp.norm.weight": f"model.layers.{n}.shared_head.norm.weight"}
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        for name, value in load_file(str(file)).items():
            if name.startswith("mtp.layers.0."):
                name = f"model.layers.{n}." + name[len("mtp.layers.0."):]
            tensors[renames.get(name, name)] = value
    save_file(tensors, str(Path(out_dir, "model.safetensors")), metadata={"format": "pt"})
    cfg = json.loads(Path(hf_dir, "config.json").read_text())
    cfg["layer_types"] = [*["linear_attention" if x else "full_attention" for x in arch.linear_attention],
                          "full_attention"]
    cfg["num_hidden_layers"] = n + 1
    Path(out_dir, "config.json").write_text(json.dumps(cfg))


def _all_ranks_true(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    failures = torch.tensor([0 if flag else 1], dtype=torch.int64)
    dist.all_reduce(failures, op=dist.ReduceOp.SUM)
    return int(failures.item()) == 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CheckFailure):
        return str(exc)
    # Unexpected exceptions keep their traceback: they usually mean a harness or
    # megatron-side surprise rather than a bad checkpoint.
    return "".join(traceback.format_exception(exc)).strip()


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="mcore_harness worker (spawned by run_checks)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--jobs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--collective-timeout", type=float, default=COLLECTIVE_TIMEOUT_S)
    opts = parser.parse_args(argv)

    started = time.monotonic()
    _apply_cpu_workarounds()
    import torch.distributed as dist
    import megatron.core  # noqa: F401 - import cost belongs to startup, not to job 0

    _patch_megatron_after_import()

    jobs = [_job_from_json(data) for data in json.loads(opts.jobs.read_text())]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{opts.port}",
        rank=opts.rank,
        world_size=opts.world_size,
        timeout=datetime.timedelta(seconds=opts.collective_timeout),
    )
    startup_s = round(time.monotonic() - started, 3)
    worker = _Worker(opts.rank, opts.world_size, opts.collective_timeout)
    results: list[dict[str, Any]] = []
    out_file = opts.out / f"rank{opts.rank}.json"
    for index, job in enumerate(jobs):
        result = worker.run_job(index, job)
        result["worker_startup_s"] = startup_s
        results.append(result)
        # Rewritten after every job so a later hang still leaves the finished reports.
        tmp = out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(out_file)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
