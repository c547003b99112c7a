"""MoE (routed experts): bit-exact round trips over TP, PP, EP, ETP and grouped-GEMM naming.

Groundwork of issue 4: Qwen3-MoE and Mixtral. MLA, shared experts, MTP and the megatron-core
strict-load checks for MoE are still to come.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from helpers import assert_same_tensors, hf_to_mcore, load_hf_tensors, mcore_to_hf
from tiny_models import TinySpec

# (tp, pp, custom layers, ep, etp or None, grouped)
LAYOUTS = [
    (1, 1, None, 1, None, False),
    (1, 1, None, 4, None, True),
    (2, 1, None, 2, None, False),
    (2, 1, None, 4, 1, True),
    (2, 2, "3,1", 2, 1, False),
    (1, 2, None, 2, None, True),
    (2, 2, None, 1, 1, True),
]
MODELS = [TinySpec("qwen3_moe"), TinySpec("mixtral")]


def _rank_dirs(path):
    return sorted(os.listdir(os.path.join(path, "release")))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp{}pp{}{}ep{}etp{}{}".format(
    l[0], l[1], "-" + l[2].replace(",", "_") if l[2] else "", l[3], l[4] or "=tp", "-gg" if l[5] else ""))
@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.family)
def test_moe_round_trip_bit_exact(tiny_hf, tmp_path, spec, layout):
    tp, pp, custom, ep, etp, grouped = layout
    hf_dir = tiny_hf(spec)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(hf_dir, mcore, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       custom_pipeline_layers=custom, expert_parallel_size=ep, expert_tensor_parallel_size=etp,
                       **{"moe-grouped-gemm": grouped}) == 0
    dirs = _rank_dirs(mcore)
    if ep > 1:
        assert all(re.fullmatch(r"mp_rank_\d\d(_\d\d\d)?_\d\d\d", d) for d in dirs), dirs
    assert mcore_to_hf(mcore, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))


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
