"""Qwen3-Next (qwen3_next) and Qwen3.5 / Qwen3.6 text models (qwen3_5, qwen3_5_moe): hybrids of
gated delta-net layers and gated full-attention layers. Bit-exact HF -> MCore -> HF round trips
over TP, PP (uneven), EP, grouped GEMM and TE/local names; where each tensor lands on which TP
rank, against an oracle written here with reshapes (not the converter's code); the per-layer
pattern; bad input (heads TP cannot split, a layer pattern that does not fit the config)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from convert_checkpoint import tensor_expr as tx
from fixtures import assert_fails, layout_id, load_hf_tensors, round_trip_layout
from helpers import assert_same_tensors, hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec

NEXT = TinySpec("qwen3_next", full_attention=(1, 3), mlp_only_layers=(0,))  # layer 0 dense, 1 and 3 full attention
NEXT_MTP = TinySpec("qwen3_next", full_attention=(1, 3), mtp_layers=1)  # plus the MTP head (mtp.*)
Q35 = TinySpec("qwen3_5")  # dense; full attention on layer 3 (transformers' default interval 4)
Q35_MOE = TinySpec("qwen3_5_moe", full_attention=(0, 2))
Q35_MTP = TinySpec("qwen3_5", mtp_layers=1)  # Qwen3.5's MTP head has the same names (its layer: dense MLP)
# tiny_models: 4 key heads of 8, 8 value heads of 16, conv kernel 4; 8 attention heads of 16 in 4 groups
NK, NV, DK, DV, KERNEL, HEADS, GROUPS, HEAD_DIM, HIDDEN = 4, 8, 8, 16, 4, 8, 4, 16, 64

# (tp, pp, custom layers, ep, etp or None, grouped, transformer_impl)
LAYOUTS = [
    (1, 1, None, 1, None, False, "local"),
    (2, 1, None, 2, None, False, "transformer_engine"),
    (2, 2, "1,3", 2, 1, False, "local"),
    (1, 2, "3,1", 2, None, True, "transformer_engine"),
    (2, 2, "3,1", 1, None, False, "transformer_engine"),
    (4, 1, None, 1, None, False, "local"),  # one key head (two value heads) per rank
]


_layout_id, _round_trip = layout_id, round_trip_layout


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("spec", [NEXT, NEXT_MTP, Q35, Q35_MTP, Q35_MOE], ids=lambda s: s.family + ("-mtp" if s.mtp_layers else ""))
def test_round_trip_bit_exact(tiny_hf, tmp_path, spec, layout):
    if spec.family == "qwen3_5":  # dense: no expert flags
        layout = (*layout[:3], 1, None, False, layout[6])
    files = _round_trip(tiny_hf(spec), tmp_path, layout)
    args = next(iter(files.values()))["args"]
    assert args.convert_checkpoint_family == spec.family


def test_bf16_round_trip_and_zero_centered_out_norm(tiny_hf, tmp_path):
    """bf16: every tensor back bit for bit; Megatron's out_norm is HF's gated-norm weight minus 1
    (exact for the tiny model's weights, all in [0.5, 2]); the other norms are stored as they are."""
    spec = TinySpec("qwen3_next", full_attention=(1, 3), dtype=torch.bfloat16)
    hf_dir = tiny_hf(spec)
    hf = load_hf_tensors(hf_dir)
    norm = hf["model.layers.0.linear_attn.norm.weight"]
    assert norm.dtype == torch.bfloat16 and bool(((norm >= 0.5) & (norm <= 2)).all())
    files = _round_trip(hf_dir, tmp_path, (2, 1, None, 1, None, False, "local"))
    for rank in ("mp_rank_00", "mp_rank_01"):
        sd = files[rank]["model"]
        out_norm = sd["decoder.layers.0.self_attention.out_norm.weight"]
        assert out_norm.dtype == torch.bfloat16
        assert torch.equal(out_norm.float(), norm.float() - 1)
        assert torch.equal(sd["decoder.layers.0.input_layernorm.weight"], hf["model.layers.0.input_layernorm.weight"])
        assert torch.equal(sd["decoder.layers.1.self_attention.q_layernorm.weight"],
                           hf["model.layers.1.self_attn.q_norm.weight"])


def test_offset_expression_is_exact_in_range():
    """The ``Offset`` node: w - 1 then + 1 gives w back bit for bit for bf16 weights in [0.5, 2]."""
    w = torch.linspace(0.5, 2.0, 4001).to(torch.bfloat16)
    leaf = tx.source(tx.TensorRef("f", "w"), torch.bfloat16, w.shape)

    class Reader:
        def read_into(self, leaf, out):
            out.copy_(leaf.window(self.value))

    reader = Reader()
    reader.value = w
    shifted = tx.materialize(tx.offset(leaf, -1.0), reader)
    assert shifted.dtype == torch.bfloat16 and torch.equal(shifted.float(), w.float() - 1)
    reader.value = shifted
    assert torch.equal(tx.materialize(tx.offset(leaf, 1.0), reader), w)
    assert tx.offset(tx.offset(leaf, -1.0), 1.0) == leaf
    assert tx.describe(tx.offset(leaf, -1.0)) == "(f:w - 1)"


def _fused_hf_blocks(hf: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """Megatron's q, k, v, z, b, a blocks (all heads, head order) from Qwen3-Next's key-head groups."""
    r = NV // NK
    qkvz = hf[f"model.layers.{layer}.linear_attn.in_proj_qkvz.weight"].view(NK, 2 * DK + 2 * r * DV, HIDDEN)
    q, k, v, z = qkvz.split([DK, DK, r * DV, r * DV], dim=1)
    b, a = hf[f"model.layers.{layer}.linear_attn.in_proj_ba.weight"].view(NK, 2 * r, HIDDEN).split([r, r], dim=1)
    return {name: t.reshape(-1, HIDDEN) for name, t in zip("qkvzba", (q, k, v, z, b, a))}


def _split_hf_blocks(hf: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The same blocks from Qwen3.5's separate projections."""
    pre = f"model.layers.{layer}.linear_attn."
    q, k, v = hf[pre + "in_proj_qkv.weight"].split([NK * DK, NK * DK, NV * DV])
    return {"q": q, "k": k, "v": v, "z": hf[pre + "in_proj_z.weight"], "b": hf[pre + "in_proj_b.weight"],
            "a": hf[pre + "in_proj_a.weight"]}


@pytest.mark.parametrize("spec", [NEXT, Q35_MOE], ids=lambda s: s.family)
def test_delta_net_and_gated_attention_tensors_per_tp_rank(tiny_hf, tmp_path, spec):
    """TP 2, local names: each rank's in_proj is its heads' [q; k; v; z; b; a], conv1d its
    [q; k; v] channels, A_log / dt_bias its value heads; the input norm stays before in_proj;
    the full-attention layer's linear_qkv holds per query group [q heads; their gates; k; v]."""
    hf_dir = tiny_hf(spec)
    hf = load_hf_tensors(hf_dir)
    files = _round_trip(hf_dir, tmp_path, (2, 1, None, 1, None, False, "local"))
    linear, full = (0, 1) if spec.family == "qwen3_next" else (1, 0)
    blocks = (_fused_hf_blocks if spec.family == "qwen3_next" else _split_hf_blocks)(hf, linear)
    pre = f"model.layers.{linear}.linear_attn."
    conv = hf[pre + "conv1d.weight"].split([NK * DK, NK * DK, NV * DV])
    for t in range(2):
        sd = files[f"mp_rank_0{t}"]["model"]
        mc = f"decoder.layers.{linear}."
        want = torch.cat([b.chunk(2)[t] for b in blocks.values()])
        assert torch.equal(sd[mc + "self_attention.in_proj.weight"], want)
        assert torch.equal(sd[mc + "self_attention.conv1d.weight"], torch.cat([c.chunk(2)[t] for c in conv]))
        for name in ("A_log", "dt_bias"):
            assert torch.equal(sd[mc + f"self_attention.{name}"], hf[pre + name].chunk(2)[t])
        assert torch.equal(sd[mc + "self_attention.out_proj.weight"], hf[pre + "out_proj.weight"].chunk(2, dim=1)[t])
        assert torch.equal(sd[mc + "input_layernorm.weight"], hf[f"model.layers.{linear}.input_layernorm.weight"])
        assert not any(k.startswith(mc + "self_attention.linear_qkv") for k in sd)

        attn = f"model.layers.{full}.self_attn."
        q_gate = hf[attn + "q_proj.weight"].view(GROUPS, HEADS // GROUPS, 2, HEAD_DIM, HIDDEN)
        k, v = (hf[attn + f"{n}_proj.weight"].view(GROUPS, 1, HEAD_DIM, HIDDEN) for n in "kv")
        per_group = torch.cat([q_gate[:, :, 0].reshape(GROUPS, -1, HEAD_DIM, HIDDEN),
                               q_gate[:, :, 1].reshape(GROUPS, -1, HEAD_DIM, HIDDEN), k, v], dim=1)
        want = per_group.reshape(-1, HIDDEN).chunk(2)[t]
        assert torch.equal(sd[f"decoder.layers.{full}.self_attention.linear_qkv.weight"], want)
        assert not any(k.startswith(f"decoder.layers.{full}.self_attention.in_proj") for k in sd)


def test_te_names_fuse_the_input_norm_into_in_proj(tiny_hf, tmp_path):
    files = _round_trip(tiny_hf(NEXT), tmp_path, (1, 1, None, 1, None, False, "transformer_engine"))
    sd = files["mp_rank_00"]["model"]
    hf = load_hf_tensors(tiny_hf(NEXT))
    assert torch.equal(sd["decoder.layers.0.self_attention.in_proj.layer_norm_weight"],
                       hf["model.layers.0.input_layernorm.weight"])
    assert torch.equal(sd["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"],
                       hf["model.layers.1.input_layernorm.weight"])
    assert torch.equal(sd["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"],  # layer 0 is dense
                       hf["model.layers.0.post_attention_layernorm.weight"])
    assert "decoder.layers.2.pre_mlp_layernorm.weight" in sd  # MoE layers keep their own
    assert not any(k.endswith("input_layernorm.weight") for k in sd)
    assert "decoder.layers.0.self_attention.in_proj._extra_state" in sd
    assert "decoder.layers.0.self_attention.conv1d._extra_state" not in sd  # a plain nn.Conv1d


def test_layer_pattern_in_the_rank_files(tiny_hf, tmp_path):
    """The arch recorded in the rank files carries the pattern and the delta-net sizes, and the
    shared expert's gate sits in every MoE layer."""
    files = _round_trip(tiny_hf(NEXT), tmp_path, (1, 2, "1,3", 1, None, False, "local"))
    args = files["mp_rank_00_000"]["args"]
    stage1 = files["mp_rank_00_001"]["model"]
    arch = args.convert_checkpoint_arch
    assert arch["linear_attention_pattern"] in ([1, 0, 1, 0], (1, 0, 1, 0))
    assert (arch["linear_num_key_heads"], arch["linear_num_value_heads"]) == (NK, NV)
    assert arch["attention_output_gate"] and arch["layernorm_zero_centered_gamma"]
    # Megatron's own args, for a training run that builds the model from them
    assert args.experimental_attention_variant == "gated_delta_net" and args.linear_attention_freq == [1, 0, 1, 0]
    assert (args.linear_num_key_heads, args.linear_num_value_heads) == (NK, NV)
    assert args.attention_output_gate and args.layernorm_zero_centered_gamma
    # stage 1 holds layers 1-3 as local 0-2: full, linear, full attention; all MoE with a gated shared expert
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in stage1
    assert "decoder.layers.1.self_attention.in_proj.weight" in stage1
    assert "decoder.layers.2.self_attention.linear_qkv.weight" in stage1
    for local in range(3):
        assert stage1[f"decoder.layers.{local}.mlp.shared_experts.gate_weight"].shape == (1, HIDDEN)


# --- bad input ------------------------------------------------------------------------------

def _copy_with_config(src: str, dst, **changes) -> str:
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_delta_net_heads_tp_cannot_split(tmp_path, capsys):
    """3 key heads (6 value heads) over TP 2: every other size divides, the heads do not."""
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    cfg = Qwen3NextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=16, num_hidden_layers=2, vocab_size=256, linear_num_key_heads=3,
                          linear_num_value_heads=6, linear_key_head_dim=8, linear_value_head_dim=16,
                          layer_types=["linear_attention", "full_attention"], num_experts=4,
                          moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts_per_tok=2)
    hf_dir = str(tmp_path / "hf")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(hf_dir)
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert_fails(capsys, hf_to_mcore(hf_dir, out, tensor_model_parallel_size=2), out,
                 "--tensor_model_parallel_size 2 does not divide linear_num_key_heads 3")


@pytest.mark.parametrize("layer_types, fragment", [
    (["linear_attention"] * 3, "layer_types has 3 entries, but num_layers is 4"),
    (["linear_attention", "sliding_attention", "linear_attention", "full_attention"],
     "layer_types holds ['sliding_attention']"),
])
def test_layer_pattern_that_does_not_fit(tiny_hf, tmp_path, capsys, layer_types, fragment):
    bad = _copy_with_config(tiny_hf(NEXT), tmp_path / "hf", layer_types=layer_types)
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert_fails(capsys, hf_to_mcore(bad, out), out, fragment)


def test_layer_pattern_that_disagrees_with_the_tensors(tiny_hf, tmp_path, capsys):
    """config.json says layer 0 has full attention; its tensors are a delta-net's."""
    bad = _copy_with_config(tiny_hf(NEXT), tmp_path / "hf",
                            layer_types=["full_attention", "full_attention", "linear_attention", "full_attention"])
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert_fails(capsys, hf_to_mcore(bad, out), out, "missing tensor model.layers.0.self_attn.q_proj.weight")


@pytest.mark.parametrize("spec", [NEXT_MTP, Q35_MOE], ids=lambda s: s.family)
def test_torch_dist_round_trip_and_keys(tiny_hf, tmp_path, spec):
    """HF -> torch_dist -> HF bit for bit; per-layer keys (the layer kinds vary), in_proj and
    conv1d one key per block with their global shapes, TE's fused input norms."""
    import torch.distributed.checkpoint as dcp

    hf_dir = tiny_hf(spec)
    dist, back = str(tmp_path / "dist"), str(tmp_path / "back")
    assert hf_to_mcore(hf_dir, dist, ckpt_format="torch_dist", transformer_impl="transformer_engine") == 0
    assert mcore_to_hf(dist, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))
    meta = dcp.FileSystemReader(os.path.join(dist, "release")).read_metadata().state_dict_metadata
    linear = 0 if spec.family == "qwen3_next" else 1
    pre = f"decoder.layers.{linear}.self_attention."
    blocks = {"query": NK * DK, "key": NK * DK, "value": NV * DV, "z": NV * DV, "beta": NV, "alpha": NV}
    for block, rows in blocks.items():
        assert tuple(meta[f"{pre}in_proj.weight.{block}"].size) == (rows, HIDDEN)
        if block in ("query", "key", "value"):
            assert tuple(meta[f"{pre}conv1d.weight.{block}"].size) == (rows, 1, KERNEL)
    assert f"{pre}in_proj.weight" not in meta and f"{pre}in_proj.layer_norm_weight" in meta
    assert not any(k.startswith("decoder.layers.self_attention") for k in meta)  # nothing stacked


def test_torch_dist_missing_block_is_one_line(tiny_hf, tmp_path, capsys):
    """A torch_dist checkpoint whose in_proj lacks its z block: one line naming the key."""
    import pickle

    hf_dir = tiny_hf(Q35)
    dist = tmp_path / "dist"
    assert hf_to_mcore(hf_dir, str(dist), ckpt_format="torch_dist", transformer_impl="transformer_engine") == 0
    metadata_file = dist / "release" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())
    del metadata.state_dict_metadata["decoder.layers.0.self_attention.in_proj.weight.z"]
    metadata_file.write_bytes(pickle.dumps(metadata))
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert_fails(capsys, mcore_to_hf(str(dist), out), out,
                 "torch_dist tensor decoder.layers.0.self_attention.in_proj.weight.z (a gated delta-net block) is missing")


def test_mtp_tensors_without_mtp_layers_in_the_config(tiny_hf, tmp_path, capsys):
    """MTP tensors (mtp.*) in a checkpoint whose config.json has no mtp_num_hidden_layers: the run
    stops naming the first one instead of dropping it."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "hf"
    shutil.copytree(tiny_hf(NEXT), bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["mtp.fc.weight"] = torch.zeros(HIDDEN, 2 * HIDDEN)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert_fails(capsys, hf_to_mcore(str(bad), out), out, "unmapped tensor mtp.fc.weight")


def test_mtp_head_lands_on_the_last_stage(tiny_hf, tmp_path):
    """mtp.fc / pre_fc_norm_embedding / pre_fc_norm_hidden / norm -> eh_proj / enorm / hnorm /
    final_layernorm; mtp.layers.0 -> the MTP transformer layer (full attention, MoE), on the last
    pipeline stage; eh_proj split by rows over TP."""
    hf_dir = tiny_hf(NEXT_MTP)
    hf = load_hf_tensors(hf_dir)
    files = _round_trip(hf_dir, tmp_path, (2, 2, "1,3", 1, None, False, "transformer_engine"))
    assert not any(k.startswith("mtp.") for k in files["mp_rank_00_000"]["model"])
    for t in range(2):
        sd = files[f"mp_rank_0{t}_001"]["model"]
        assert torch.equal(sd["mtp.layers.0.eh_proj.weight"], hf["mtp.fc.weight"].chunk(2)[t])
        for hf_name, mc in (("pre_fc_norm_embedding", "enorm"), ("pre_fc_norm_hidden", "hnorm"), ("norm", "final_layernorm")):
            assert torch.equal(sd[f"mtp.layers.0.{mc}.weight"], hf[f"mtp.{hf_name}.weight"])
        inner = "mtp.layers.0.transformer_layer."
        assert torch.equal(sd[inner + "self_attention.linear_qkv.layer_norm_weight"], hf["mtp.layers.0.input_layernorm.weight"])
        assert torch.equal(sd[inner + "mlp.shared_experts.gate_weight"], hf["mtp.layers.0.mlp.shared_expert_gate.weight"])
        assert not any(k.startswith(inner + "self_attention.in_proj") for k in sd)


def test_pattern_from_full_attention_interval(tiny_hf, tmp_path):
    """A config.json without layer_types (as Qwen3-Next-80B's): full_attention_interval 2 makes
    layers 1 and 3 full attention, as transformers reads it; the round trip keeps that config."""
    src = _copy_with_config(tiny_hf(NEXT), tmp_path / "hf", full_attention_interval=2)
    cfg = json.load(open(os.path.join(src, "config.json")))
    del cfg["layer_types"]
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    files = _round_trip(src, tmp_path, (2, 1, None, 1, None, False, "local"))
    assert list(files["mp_rank_00"]["args"].convert_checkpoint_arch["linear_attention_pattern"]) == [1, 0, 1, 0]


def test_pattern_default_is_transformers(tiny_hf, tmp_path):
    """Neither layer_types nor full_attention_interval: transformers' interval 4 (layer 3 full)."""
    src = _copy_with_config(tiny_hf(Q35), tmp_path / "hf")
    cfg = json.load(open(os.path.join(src, "config.json")))
    del cfg["layer_types"]
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    files = _round_trip(src, tmp_path, (1, 1, None, 1, None, False, "local"))
    assert list(files["mp_rank_00"]["args"].convert_checkpoint_arch["linear_attention_pattern"]) == [1, 1, 1, 0]


def test_more_mtp_layers_than_the_head_holds(tiny_hf, tmp_path, capsys):
    """Qwen3-Next stores one mtp.fc / mtp.*norm set: two MTP layers cannot be mapped."""
    bad = _copy_with_config(tiny_hf(NEXT_MTP), tmp_path / "hf", mtp_num_hidden_layers=2)
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert_fails(capsys, hf_to_mcore(bad, out), out, "stores one set of MTP tensors (mtp.*)", "2 MTP layers")
