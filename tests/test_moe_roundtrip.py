"""MoE (routed experts): bit-exact round trips over TP, PP, EP, ETP and grouped-GEMM naming,
for Qwen3-MoE, Mixtral, DeepSeek-V3 (MLA, shared expert, router bias, dense first layer, MTP)
and DeepSeek-V2-Lite (MLA without q-LoRA, shared experts)."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from fixtures import load_hf_tensors
from helpers import assert_same_tensors, convert, hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec

# (tp, pp, custom layers, ep, etp or None, grouped, transformer_impl)
LAYOUTS = [
    (1, 1, None, 1, None, False, "transformer_engine"),
    (1, 1, None, 4, None, True, "local"),
    (2, 1, None, 2, None, False, "transformer_engine"),
    (2, 1, None, 4, 1, True, "local"),
    (2, 2, "3,1", 2, 1, False, "local"),
    (1, 2, None, 2, None, True, "transformer_engine"),
    (2, 2, "1,3", 1, 1, True, "transformer_engine"),
]
DEEPSEEK_V3 = TinySpec("deepseek_v3", mtp_layers=1)
MODELS = [TinySpec("qwen3_moe"), TinySpec("mixtral"), DEEPSEEK_V3, TinySpec("deepseek_v2"),
          TinySpec("qwen2_moe", mlp_only_layers=(1,))]


def _rank_dirs(path):
    return sorted(os.listdir(os.path.join(path, "release")))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp{}pp{}{}ep{}etp{}{}-{}".format(
    l[0], l[1], "-" + l[2].replace(",", "_") if l[2] else "", l[3], l[4] or "=tp", "-gg" if l[5] else "",
    "te" if l[6] == "transformer_engine" else "local"))
@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.family)
def test_moe_round_trip_bit_exact(tiny_hf, tmp_path, spec, layout):
    tp, pp, custom, ep, etp, grouped, impl = layout
    hf_dir = tiny_hf(spec)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(hf_dir, mcore, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       custom_pipeline_layers=custom, expert_parallel_size=ep, expert_tensor_parallel_size=etp,
                       transformer_impl=impl, **{"moe-grouped-gemm": grouped}) == 0
    dirs = _rank_dirs(mcore)
    if ep > 1:
        assert all(re.fullmatch(r"mp_rank_\d\d(_\d\d\d)?_\d\d\d", d) for d in dirs), dirs
    assert mcore_to_hf(mcore, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf_dir, "config.json")))


@pytest.mark.parametrize("spec,flags", [
    # VPP=2 with MoE, MLA and MTP: the MTP layer and its embedding copy go to the last chunk.
    (DEEPSEEK_V3, dict(pipeline_model_parallel_size=2, **{"num-virtual-stages-per-pipeline-rank": 2},
                       tensor_model_parallel_size=2, expert_parallel_size=2, transformer_impl="local")),
    (TinySpec("qwen3_moe", mlp_only_layers=(0, 2)),
     dict(pipeline_model_parallel_size=2, **{"num-virtual-stages-per-pipeline-rank": 2}, expert_parallel_size=2,
          expert_tensor_parallel_size=1, **{"moe-grouped-gemm": True})),
    # Two MTP layers, uneven pipeline; 0.19's inner-layer name.
    (TinySpec("deepseek_v3", mtp_layers=2), dict(pipeline_model_parallel_size=2, custom_pipeline_layers="3,1",
                                                 expert_parallel_size=4, mtp_layer_name="mtp_model_layer")),
    # No dense first layer.
    (TinySpec("deepseek_v3", first_dense=0), dict(tensor_model_parallel_size=2, expert_parallel_size=2)),
], ids=["dsv3-vpp2-mtp", "qwen3moe-dense-layers-vpp2", "dsv3-mtp2-0.19-names", "dsv3-all-moe"])
def test_moe_round_trip_variants(tiny_hf, tmp_path, spec, flags):
    hf_dir = tiny_hf(spec)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(hf_dir, mcore, **flags) == 0
    assert mcore_to_hf(mcore, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))


def _model(mcore_dir, rank_dir, key="model"):
    return torch.load(os.path.join(mcore_dir, "release", rank_dir, "model_optim_rng.pt"), weights_only=True)[key]


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_mla_names_and_splits_per_spec(tiny_hf, tmp_path, impl):
    """Local spec: down projections split over TP, q/kv norms kept. TE: down projections
    replicated, q/kv norms fused into the up projections (as megatron-core's specs build them)."""
    hf_dir = tiny_hf(DEEPSEEK_V3)
    hf = load_hf_tensors(hf_dir)
    out = str(tmp_path / "m")
    assert hf_to_mcore(hf_dir, out, tensor_model_parallel_size=2, transformer_impl=impl) == 0
    for tp_rank in (0, 1):
        sd = _model(out, f"mp_rank_0{tp_rank}")
        attn = "decoder.layers.1.self_attention."
        q_down, kv_down = hf["model.layers.1.self_attn.q_a_proj.weight"], hf["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
        q_norm = hf["model.layers.1.self_attn.q_a_layernorm.weight"]
        if impl == "local":
            assert torch.equal(sd[attn + "linear_q_down_proj.weight"], q_down.chunk(2)[tp_rank])
            assert torch.equal(sd[attn + "linear_kv_down_proj.weight"], kv_down.chunk(2)[tp_rank])
            assert torch.equal(sd[attn + "q_layernorm.weight"], q_norm)
            assert "decoder.layers.0.pre_mlp_layernorm.weight" in sd and "decoder.layers.0.mlp.linear_fc1.weight" in sd
        else:
            assert torch.equal(sd[attn + "linear_q_down_proj.weight"], q_down)
            assert torch.equal(sd[attn + "linear_kv_down_proj.weight"], kv_down)
            assert torch.equal(sd[attn + "linear_q_up_proj.layer_norm_weight"], q_norm)
            assert attn + "kv_layernorm.weight" not in sd and attn + "linear_kv_up_proj.layer_norm_weight" in sd
            assert attn + "linear_q_down_proj._extra_state" in sd
            # Dense layer 0 fuses its pre-MLP norm into fc1; MoE layers keep theirs.
            assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in sd
            assert "decoder.layers.1.pre_mlp_layernorm.weight" in sd
        assert "decoder.layers.1.input_layernorm.weight" in sd  # MLA has no fused qkv: the norm stays
        assert torch.equal(sd[attn + "linear_kv_up_proj.weight"],
                           hf["model.layers.1.self_attn.kv_b_proj.weight"].chunk(2)[tp_rank])
        assert torch.equal(sd["decoder.layers.1.mlp.router.expert_bias"], hf["model.layers.1.mlp.gate.e_score_correction_bias"])
        assert sd["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
        gate, up = (hf[f"model.layers.1.mlp.shared_experts.{p}_proj.weight"].chunk(2)[tp_rank] for p in ("gate", "up"))
        assert torch.equal(sd["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"], torch.cat([gate, up]))


def test_mtp_on_last_stage_with_embedding_copy(tiny_hf, tmp_path):
    hf_dir = tiny_hf(DEEPSEEK_V3)
    hf = load_hf_tensors(hf_dir)
    out = str(tmp_path / "m")
    assert hf_to_mcore(hf_dir, out, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                       transformer_impl="local") == 0
    first, last = _model(out, "mp_rank_01_000"), _model(out, "mp_rank_01_001")
    assert not any(k.startswith("mtp.") for k in first)
    assert torch.equal(last["embedding.word_embeddings.weight"], first["embedding.word_embeddings.weight"])
    assert torch.equal(last["mtp.layers.0.eh_proj.weight"], hf["model.layers.4.eh_proj.weight"].chunk(2)[1])
    assert torch.equal(last["mtp.layers.0.final_layernorm.weight"], hf["model.layers.4.shared_head.norm.weight"])
    assert torch.equal(last["mtp.layers.0.transformer_layer.self_attention.linear_q_up_proj.weight"],
                       hf["model.layers.4.self_attn.q_b_proj.weight"].chunk(2)[1])
    assert "mtp.layers.0.transformer_layer.mlp.router.expert_bias" in last  # the MTP layer is MoE like the last layer
    args = torch.load(os.path.join(out, "release", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=True)["args"]
    assert (args.mtp_num_layers, args.moe_layer_freq, args.multi_latent_attention) == (1, [0, 1, 1, 1], True)


def test_missing_mtp_tensors_name_the_fix(tiny_hf, tmp_path, capsys):
    """transformers' own DeepSeek-V3 save has num_nextn_predict_layers 1 but no MTP weights."""
    hf_dir = tiny_hf(TinySpec("deepseek_v3", mtp_layers=0))
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert cfg["num_nextn_predict_layers"] == 0  # our fixture writes the truth; make it lie
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    json.dump(dict(cfg, num_nextn_predict_layers=1), open(bad / "config.json", "w"))
    out, back = str(tmp_path / "m"), str(tmp_path / "back")
    assert hf_to_mcore(str(bad), out) == 2
    err = capsys.readouterr().err
    assert "missing tensor model.layers.4." in err and "--mtp_num_layers 0" in err
    assert not os.path.exists(out)
    assert hf_to_mcore(str(bad), out, mtp_num_layers=0) == 0
    assert mcore_to_hf(out, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))
    assert json.load(open(os.path.join(back, "config.json")))["num_nextn_predict_layers"] == 0


@pytest.mark.parametrize("spec", [DEEPSEEK_V3, TinySpec("mixtral")], ids=lambda s: s.family)
def test_mcore_to_mcore_relayout(tiny_hf, tmp_path, spec):
    """MCore -> MCore through another TP/PP/EP/ETP/naming equals converting HF straight to that layout."""
    hf_dir = tiny_hf(spec)
    a, b, direct, back = (str(tmp_path / n) for n in ("a", "b", "direct", "back"))
    assert hf_to_mcore(hf_dir, a, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                       expert_parallel_size=2, transformer_impl="local") == 0
    target = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=2, custom_pipeline_layers="3,1",
                  expert_parallel_size=4, expert_tensor_parallel_size=1, **{"moe-grouped-gemm": True})
    assert convert("--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", a,
                   "--save_ckpt_path", b, **target) == 0
    assert hf_to_mcore(hf_dir, direct, **target) == 0
    assert _rank_dirs(b) == _rank_dirs(direct)
    for d in _rank_dirs(b):
        got, want = _model(b, d), _model(direct, d)
        assert list(got) == list(want), d
        for k, v in want.items():
            assert (v is None and got[k] is None) or torch.equal(got[k], v), (d, k)
    assert mcore_to_hf(b, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))


def test_expert_count_disagreeing_with_config_is_an_error(tiny_hf, tmp_path, capsys):
    hf_dir = tiny_hf(TinySpec("qwen3_moe"))
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    cfg = json.load(open(bad / "config.json"))
    key = "num_local_experts" if "num_local_experts" in cfg else "num_experts"  # transformers 5 writes the former
    json.dump(dict(cfg, **{key: 8}), open(bad / "config.json", "w"))
    out = str(tmp_path / "m")
    assert hf_to_mcore(str(bad), out) == 2
    assert "holds 4 routed experts, but the config says num_experts 8" in capsys.readouterr().err
    # MCore side: a checkpoint with 4 experts read with an architecture that says 8.
    assert hf_to_mcore(hf_dir, out, expert_parallel_size=2) == 0
    arch_yaml = tmp_path / "arch.yaml"
    arch_yaml.write_text("family: qwen3_moe\nnum_experts: 8\n")
    assert mcore_to_hf(out, str(tmp_path / "back"), config_file=str(arch_yaml)) == 2
    err = capsys.readouterr().err
    assert "holds 2 experts per expert-parallel rank x EP 2 = 4 experts" in err and "num_experts 8" in err


def test_expert_placement_local_indices_and_names(tiny_hf, tmp_path):
    """EP rank e holds experts [2e, 2e+2) with local indices; grouped names weight<i>; ETP=1 keeps them whole."""
    hf = load_hf_tensors(tiny_hf(TinySpec("qwen3_moe")))
    out = str(tmp_path / "m")
    assert hf_to_mcore(tiny_hf(TinySpec("qwen3_moe")), out, tensor_model_parallel_size=2, expert_parallel_size=2,
                       expert_tensor_parallel_size=1, **{"moe-grouped-gemm": True}) == 0
    # TP2 EP2 ETP1: megatron's rank order gives files (tp 0, ep 0) and (tp 1, ep 1) only.
    assert _rank_dirs(out) == ["mp_rank_00_000", "mp_rank_01_001"]
    sd = torch.load(os.path.join(out, "release", "mp_rank_01_001", "model_optim_rng.pt"), weights_only=True)["model"]
    for local in (0, 1):
        g = 2 + local
        gate, up = hf[f"model.layers.0.mlp.experts.{g}.gate_proj.weight"], hf[f"model.layers.0.mlp.experts.{g}.up_proj.weight"]
        assert torch.equal(sd[f"decoder.layers.0.mlp.experts.linear_fc1.weight{local}"], torch.cat([gate, up]))
        assert torch.equal(sd[f"decoder.layers.0.mlp.experts.linear_fc2.weight{local}"],
                           hf[f"model.layers.0.mlp.experts.{g}.down_proj.weight"])
    assert "decoder.layers.0.mlp.experts.linear_fc1._extra_state" in sd
    assert torch.equal(sd["decoder.layers.0.mlp.router.weight"], hf["model.layers.0.mlp.gate.weight"])
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in sd  # MoE layers keep their own norm under TE
    args = torch.load(os.path.join(out, "release", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=True)["args"]
    assert (args.expert_model_parallel_size, args.expert_tensor_parallel_size, args.num_experts) == (2, 1, 4)


def test_moe_without_saved_args_infers_ep_from_content(tiny_hf, tmp_path):
    """mp_rank_TT_XXX is ambiguous (PP or EP); without args the content decides."""
    spec = TinySpec("mixtral")
    mcore, back = str(tmp_path / "m"), str(tmp_path / "back")
    assert hf_to_mcore(tiny_hf(spec), mcore, expert_parallel_size=2) == 0
    for d in _rank_dirs(mcore):
        path = os.path.join(mcore, "release", d, "model_optim_rng.pt")
        ckpt = torch.load(path, weights_only=True)
        arch = ckpt["args"].convert_checkpoint_arch
        for name in ("pipeline_model_parallel_size", "expert_model_parallel_size"):
            delattr(ckpt["args"], name)
        torch.save(ckpt, path)
    assert mcore_to_hf(mcore, back) == 0
    assert_same_tensors(load_hf_tensors(tiny_hf(spec)), load_hf_tensors(back))
    assert arch["num_experts"] == 4


@pytest.mark.parametrize("flags,fragment", [
    (dict(expert_parallel_size=3), "--expert_parallel_size 3 does not divide num_experts 4"),
    (dict(tensor_model_parallel_size=1, expert_parallel_size=4, expert_tensor_parallel_size=2),
     "two different expert shards"),
    (dict(expert_tensor_parallel_size=64), "--expert_tensor_parallel_size 64 does not divide moe_ffn_hidden_size 32"),
])
def test_moe_bad_layouts(tiny_hf, tmp_path, capsys, flags, fragment):
    out = str(tmp_path / "out")
    assert hf_to_mcore(tiny_hf(TinySpec("qwen3_moe")), out, **flags) == 2
    assert fragment in capsys.readouterr().err
    assert not os.path.exists(out)


def test_expert_flags_on_dense_model_are_rejected(tiny_hf, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert hf_to_mcore(tiny_hf(TinySpec("llama")), out, expert_parallel_size=2) == 2
    assert "has no routed experts" in capsys.readouterr().err


def test_shared_expert_gate_and_dense_layer(tiny_hf, tmp_path):
    """Qwen2-MoE: the shared-expert gate is Megatron's shared_experts.gate_weight; a layer in
    mlp_only_layers is a dense MLP (TE: its pre-MLP norm fused into fc1)."""
    hf_dir = tiny_hf(TinySpec("qwen2_moe", mlp_only_layers=(1,)))
    hf = load_hf_tensors(hf_dir)
    out = str(tmp_path / "m")
    assert hf_to_mcore(hf_dir, out, tensor_model_parallel_size=2) == 0
    sd = _model(out, "mp_rank_01")
    assert torch.equal(sd["decoder.layers.0.mlp.shared_experts.gate_weight"], hf["model.layers.0.mlp.shared_expert_gate.weight"])
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in sd and "decoder.layers.1.mlp.router.weight" not in sd
    args = torch.load(os.path.join(out, "release", "mp_rank_00", "model_optim_rng.pt"), weights_only=True)["args"]
    assert args.moe_layer_freq == [1, 0, 1, 1] and args.moe_shared_expert_intermediate_size == 64
    assert args.moe_shared_expert_gate is True


def test_router_expert_bias_is_fp32_in_a_bf16_model(tiny_hf, tmp_path):
    """Megatron keeps router.expert_bias in fp32 (and so do DeepSeek's HF files): a bf16 bias is
    widened losslessly on the way in and, its source dtype being recorded, narrowed back to bf16
    on the way out (issue 13: dtypes round-trip); everything else keeps bf16."""
    hf_dir = tiny_hf(TinySpec("deepseek_v3", mtp_layers=1, dtype=torch.bfloat16))
    hf = load_hf_tensors(hf_dir)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert hf[bias].dtype == torch.bfloat16
    mcore, back = str(tmp_path / "m"), str(tmp_path / "back")
    assert hf_to_mcore(hf_dir, mcore, tensor_model_parallel_size=2, expert_parallel_size=2) == 0
    sd = _model(mcore, "mp_rank_01_001")
    assert sd["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
    assert torch.equal(sd["decoder.layers.1.mlp.router.expert_bias"], hf[bias].float())
    assert sd["mtp.layers.0.transformer_layer.mlp.router.expert_bias"].dtype == torch.float32
    assert sd["decoder.layers.1.mlp.router.weight"].dtype == torch.bfloat16
    assert mcore_to_hf(mcore, back) == 0
    out = load_hf_tensors(back)
    biases = [k for k in hf if k.endswith("e_score_correction_bias")]
    assert len(biases) == 4 and all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], hf[k]) for k in biases)
    assert_same_tensors({k: v for k, v in hf.items() if k not in biases}, {k: v for k, v in out.items() if k not in biases})


@pytest.mark.parametrize("spec", [DEEPSEEK_V3, TinySpec("qwen3_moe", mlp_only_layers=(0, 2)),
                                  TinySpec("qwen2_moe", mlp_only_layers=(1,)), TinySpec("mixtral")],
                         ids=lambda s: s.family)
def test_synthesized_config_keeps_the_dense_layers(tiny_hf, spec):
    """A config.json written from the architecture alone (foreign Megatron checkpoint) derives
    the same architecture again, dense/MoE layer pattern included."""
    from convert_checkpoint.config.family import family_for_hf_config

    config = json.load(open(os.path.join(tiny_hf(spec), "config.json")))
    family = family_for_hf_config(config)
    arch = family.arch_from_config(config)
    assert (arch.moe_layer_pattern is None) == (spec.family == "mixtral")
    assert family.arch_from_config(family.config_from_arch(arch)) == arch
