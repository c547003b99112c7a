"""Vision-language families (issue 19 item 7): Qwen2.5-VL (qwen2_5_vl) and Qwen3-VL (qwen3_vl).

Bit-exact HF -> MCore -> HF round trips over TP, PP (uneven), encoder TP and TE/local names; the
Megatron side laid out as LoongForge's single-pass VLM conversion writes it: the language model
under ``foundation_model.``, the vision tower under ``encoder_model.image_encoder.`` (first stage,
split by the encoder TP size), the merger under ``encoder_model.image_projector.`` and an
embedding copy ``encoder_model.text_encoder.word_embeddings``; LoongForge's VLM flags; bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fixtures import assert_fails, load_hf_tensors
from helpers import assert_same_tensors, hf_to_mcore, mcore_to_hf, rank_files
from tiny_models import TinySpec

QWEN25_VL = TinySpec("qwen2_5_vl", dtype=torch.bfloat16)
QWEN3_VL = TinySpec("qwen3_vl", dtype=torch.bfloat16)
QWEN25_VL_TIED = TinySpec("qwen2_5_vl", tied=True, dtype=torch.bfloat16)
QWEN3_VL_MOE = TinySpec("qwen3_vl_moe", mlp_only_layers=(0,), dtype=torch.bfloat16)  # layer 0 dense

ENC = "encoder_model.image_encoder."
PROJ = "encoder_model.image_projector."
LM = "foundation_model."

# (tp, pp, custom layers, encoder tp or None (= tp), transformer_impl)
LAYOUTS = [
    (1, 1, None, None, "transformer_engine"),
    (2, 1, None, None, "local"),
    (2, 2, "1,3", 1, "transformer_engine"),
    (1, 2, "3,1", None, "local"),
    (2, 2, "3,1", 2, "local"),
]


def _layout_id(layout) -> str:
    tp, pp, custom, enc, impl = layout
    return (f"tp{tp}pp{pp}{'-' + custom.replace(',', '_') if custom else ''}enc{enc or '=tp'}-"
            f"{'te' if impl == 'transformer_engine' else 'local'}")


def _round_trip(hf_dir: str, tmp_path, layout) -> dict[str, dict]:
    tp, pp, custom, enc, impl = layout
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(hf_dir, mcore, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       custom_pipeline_layers=custom, encoder_tensor_model_parallel_size=enc,
                       transformer_impl=impl) == 0
    assert mcore_to_hf(mcore, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf_dir, "config.json")))
    return rank_files(mcore)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("spec", [QWEN25_VL, QWEN3_VL], ids=lambda s: s.family)
def test_round_trip_bit_exact(tiny_hf, tmp_path, spec, layout):
    files = _round_trip(tiny_hf(spec), tmp_path, layout)
    assert next(iter(files.values()))["args"].convert_checkpoint_family == spec.family


# (tp, pp, custom layers, encoder tp, impl, ep, etp, grouped)
MOE_LAYOUTS = [
    (1, 1, None, None, "transformer_engine", 1, None, False),
    (2, 1, None, 1, "local", 2, None, False),
    (2, 2, "1,3", 2, "transformer_engine", 2, 1, True),
    (1, 2, "3,1", None, "local", 2, None, True),
]


@pytest.mark.parametrize("layout", MOE_LAYOUTS, ids=lambda x: "tp{}pp{}{}enc{}-{}-ep{}etp{}{}".format(
    x[0], x[1], "-" + x[2].replace(",", "_") if x[2] else "", x[3] or "=tp", x[4][:5], x[5], x[6] or "=tp",
    "-gg" if x[7] else ""))
def test_qwen3_vl_moe_round_trip_bit_exact(tiny_hf, tmp_path, layout):
    tp, pp, custom, enc, impl, ep, etp, grouped = layout
    hf_dir = tiny_hf(QWEN3_VL_MOE)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(hf_dir, mcore, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       custom_pipeline_layers=custom, encoder_tensor_model_parallel_size=enc, transformer_impl=impl,
                       expert_parallel_size=ep, expert_tensor_parallel_size=etp, **{"moe-grouped-gemm": grouped}) == 0
    assert mcore_to_hf(mcore, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))


def test_qwen3_vl_moe_experts(tiny_hf, tmp_path):
    """Published [in, out] stacks <-> per-expert fc1 [gate; up] / fc2; EP 2 holds experts 2-3 as 0-1;
    transformers 5's own [out, in] save reads too and comes back in the published form."""
    hf_dir = tiny_hf(QWEN3_VL_MOE)
    hf = load_hf_tensors(hf_dir)
    mcore = str(tmp_path / "mcore")
    assert hf_to_mcore(hf_dir, mcore, expert_parallel_size=2) == 0
    sd = rank_files(mcore)["mp_rank_00_001"]["model"]
    gate_up = hf["model.language_model.layers.1.mlp.experts.gate_up_proj"]  # [E, hidden, 2 x 16]
    down = hf["model.language_model.layers.1.mlp.experts.down_proj"]  # [E, 16, hidden]
    assert gate_up.shape == (4, 64, 32) and down.shape == (4, 16, 64)
    head = LM + "decoder.layers.1.mlp.experts.local_experts.1."
    assert torch.equal(sd[head + "linear_fc1.weight"], gate_up[3].t())
    assert torch.equal(sd[head + "linear_fc2.weight"], down[3].t())
    assert LM + "decoder.layers.0.mlp.linear_fc1.weight" in sd  # mlp_only_layers: dense
    # transformers 5's layout in: the same rank files
    t5 = tmp_path / "t5"
    t5.mkdir()
    for f in os.listdir(hf_dir):
        if not f.endswith(".safetensors"):
            (t5 / f).write_bytes(open(os.path.join(hf_dir, f), "rb").read())
    from safetensors.torch import save_file

    save_file({k: (v.transpose(1, 2).contiguous() if k.endswith(("gate_up_proj", "down_proj")) and v.dim() == 3 else v)
               for k, v in hf.items()}, str(t5 / "model.safetensors"), metadata={"format": "pt"})
    mcore5, back = str(tmp_path / "mcore5"), str(tmp_path / "back")
    assert hf_to_mcore(str(t5), mcore5, expert_parallel_size=2) == 0
    for rank, ckpt in rank_files(mcore5).items():
        ours = rank_files(mcore)[rank]["model"]
        assert all(torch.equal(v, ours[k]) for k, v in ckpt["model"].items() if v is not None), rank
    assert mcore_to_hf(mcore5, back) == 0
    assert_same_tensors(hf, load_hf_tensors(back))


def test_qwen3_vl_moe_published_layout_loads_in_transformers(tiny_hf):
    """transformers 5 reads the published layout this tool writes into the model that made it."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_hf(QWEN3_VL_MOE))
    hf = load_hf_tensors(tiny_hf(QWEN3_VL_MOE))
    experts = model.model.language_model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj.data, hf["model.language_model.layers.1.mlp.experts.gate_up_proj"].transpose(1, 2))


def test_tied_embeddings_round_trip(tiny_hf, tmp_path):
    files = _round_trip(tiny_hf(QWEN25_VL_TIED), tmp_path, (2, 2, "1,3", 1, "transformer_engine"))
    last = files["mp_rank_00_001"]["model"]
    assert torch.equal(last[LM + "output_layer.weight"], files["mp_rank_00_000"]["model"][LM + "embedding.word_embeddings.weight"])


def _vision_block(hf: dict, layer: int) -> dict[str, torch.Tensor]:
    return {k[len(f"visual.blocks.{layer}."):]: v for k, v in hf.items() if k.startswith(f"visual.blocks.{layer}.")}


def test_qwen25_vl_tensors_land_where_loongforge_puts_them(tiny_hf, tmp_path):
    """TP 2, encoder TP 1, PP 2: the tower whole in both TP files of stage 0 only, qkv regrouped per
    head, SwiGLU fc1 = [gate; up] (bias too), the merger replicated, TE-fused norms."""
    hf_dir = tiny_hf(QWEN25_VL)
    hf = load_hf_tensors(hf_dir)
    files = _round_trip(hf_dir, tmp_path, (2, 2, "1,3", 1, "transformer_engine"))
    assert sorted(files) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    block = _vision_block(hf, 1)
    heads, d = 4, 8
    for t in (0, 1):
        sd = files[f"mp_rank_0{t}_000"]["model"]
        layer = ENC + "decoder.layers.1."
        qkv = block["attn.qkv.weight"]
        q, k, v = qkv[:32].view(heads, d, -1), qkv[32:64].view(heads, d, -1), qkv[64:].view(heads, d, -1)
        assert torch.equal(sd[layer + "self_attention.linear_qkv.weight"], torch.cat([q, k, v], 1).reshape(96, 32))
        fc1_bias = torch.cat([block["mlp.gate_proj.bias"], block["mlp.up_proj.bias"]])
        assert torch.equal(sd[layer + "mlp.linear_fc1.bias"], fc1_bias)
        assert torch.equal(sd[layer + "self_attention.linear_qkv.layer_norm_weight"], block["norm1.weight"])
        assert torch.equal(sd[layer + "mlp.linear_fc1.layer_norm_weight"], block["norm2.weight"])
        assert torch.equal(sd[ENC + "patch_embed.proj.weight"], hf["visual.patch_embed.proj.weight"])
        assert torch.equal(sd[PROJ + "layernorm.weight"], hf["visual.merger.ln_q.weight"])
        assert torch.equal(sd[PROJ + "linear_fc2.weight"], hf["visual.merger.mlp.2.weight"])
        assert sd[PROJ + "linear_fc1._extra_state"] is None
        embed = sd[LM + "embedding.word_embeddings.weight"]
        assert torch.equal(sd["encoder_model.text_encoder.word_embeddings.weight"], embed)
        assert torch.equal(embed[: 125 - 125 * t], hf["model.embed_tokens.weight"][125 * t: 125])  # 250 rows, padded 256
    for t in (0, 1):  # the second stage holds no vision tensor
        assert not [k for k in files[f"mp_rank_0{t}_001"]["model"] if k.startswith("encoder_model.")]
    later = files["mp_rank_00_001"]["model"]
    assert LM + "decoder.layers.2.self_attention.linear_qkv.weight" in later  # 3 layers, renumbered 0..2
    assert LM + "output_layer.weight" in later and LM + "decoder.final_layernorm.weight" in later


def test_encoder_tp_splits_the_tower(tiny_hf, tmp_path):
    """Encoder TP 2 under TP 2: heads 0-1 in file 0, heads 2-3 in file 1; MLP fc1 [gate_t; up_t]."""
    hf_dir = tiny_hf(QWEN25_VL)
    block = _vision_block(load_hf_tensors(hf_dir), 0)
    files = _round_trip(hf_dir, tmp_path, (2, 1, None, 2, "local"))
    for t in (0, 1):
        sd = files[f"mp_rank_0{t}"]["model"]
        layer = ENC + "decoder.layers.0."
        qkv = sd[layer + "self_attention.linear_qkv.weight"]
        assert qkv.shape == (48, 32)
        assert torch.equal(qkv[:8], block["attn.qkv.weight"][16 * t: 16 * t + 8])  # q of head 2t
        fc1 = sd[layer + "mlp.linear_fc1.weight"]
        assert torch.equal(fc1[:24], block["mlp.gate_proj.weight"][24 * t: 24 * t + 24])
        assert torch.equal(fc1[24:], block["mlp.up_proj.weight"][24 * t: 24 * t + 24])
        assert torch.equal(sd[layer + "mlp.linear_fc2.weight"], block["mlp.down_proj.weight"][:, 24 * t: 24 * t + 24])
        assert torch.equal(sd[layer + "mlp.linear_fc2.bias"], block["mlp.down_proj.bias"])
        assert torch.equal(sd[layer + "input_layernorm.weight"], block["norm1.weight"])  # local names


def test_qwen3_vl_deepstack_and_layernorm_biases(tiny_hf, tmp_path):
    hf_dir = tiny_hf(QWEN3_VL)
    hf = load_hf_tensors(hf_dir)
    files = _round_trip(hf_dir, tmp_path, (2, 1, None, 1, "transformer_engine"))
    sd = files["mp_rank_01"]["model"]
    for k in (0, 1):
        for ours, theirs in (("layernorm.bias", "norm.bias"), ("linear_fc1.weight", "linear_fc1.weight"),
                             ("linear_fc2.bias", "linear_fc2.bias")):
            assert torch.equal(sd[f"{ENC}deepstack_merger_list.{k}.{ours}"],
                               hf[f"model.visual.deepstack_merger_list.{k}.{theirs}"])
    assert f"{ENC}deepstack_merger_list.2.layernorm.weight" not in sd
    assert torch.equal(sd[ENC + "pos_embed.weight"], hf["model.visual.pos_embed.weight"])
    assert torch.equal(sd[ENC + "patch_embed.proj.bias"], hf["model.visual.patch_embed.proj.bias"])
    assert torch.equal(sd[ENC + "decoder.layers.2.self_attention.linear_qkv.layer_norm_bias"],
                       hf["model.visual.blocks.2.norm1.bias"])
    assert torch.equal(sd[PROJ + "layernorm.bias"], hf["model.visual.merger.norm.bias"])
    assert torch.equal(sd[LM + "decoder.layers.0.self_attention.q_layernorm.weight"],
                       hf["model.language_model.layers.0.self_attn.q_norm.weight"])


def test_mcore_source_reads_encoder_tp_and_checks_the_flag(tiny_hf, tmp_path, capsys):
    mcore = str(tmp_path / "mcore")
    assert hf_to_mcore(tiny_hf(QWEN25_VL), mcore, tensor_model_parallel_size=2, encoder_tensor_model_parallel_size=1) == 0
    capsys.readouterr()
    back = str(tmp_path / "back")
    rc = mcore_to_hf(mcore, back, encoder_tensor_model_parallel_size=2)
    assert_fails(capsys, rc, back, "--encoder_tensor_model_parallel_size 2 disagrees with the checkpoint", "1")
    assert mcore_to_hf(mcore, back, encoder_tensor_model_parallel_size=1) == 0


@pytest.mark.parametrize("flags, fragments", [
    (dict(tensor_model_parallel_size=2, encoder_tensor_model_parallel_size=4),
     ["--encoder_tensor_model_parallel_size 4 does not divide --tensor_model_parallel_size 2"]),
    (dict(tensor_model_parallel_size=3, encoder_tensor_model_parallel_size=3),
     ["--encoder_tensor_model_parallel_size 3 does not divide the vision tower's num_heads 4"]),
    (dict(encoder_tensor_model_parallel_size=0), ["--encoder_tensor_model_parallel_size 0"]),
])
def test_bad_encoder_tp(tiny_hf, tmp_path, capsys, flags, fragments):
    out, hf_dir = str(tmp_path / "out"), tiny_hf(QWEN25_VL)
    capsys.readouterr()  # the model's generation
    assert_fails(capsys, hf_to_mcore(hf_dir, out, **flags), out, *fragments)


def test_encoder_tp_on_a_language_model_is_refused(tiny_hf, tmp_path, capsys):
    out, hf_dir = str(tmp_path / "out"), tiny_hf(TinySpec("qwen2"))
    capsys.readouterr()  # the model's generation
    rc = hf_to_mcore(hf_dir, out, encoder_tensor_model_parallel_size=1)
    assert_fails(capsys, rc, out, "--encoder_tensor_model_parallel_size applies to vision-language models")


def _loongforge_yamls(tmp_path) -> dict[str, str]:
    """Stand-ins at LoongForge's paths (only their file names and existence are read)."""
    root = tmp_path / "loongforge" / "configs" / "models"
    paths = {"convert": root / "qwen2.5/ckpt_convert/qwen2_5_convert.yaml",
             "vision": root / "image_encoder/ckpt_convert/qwen2_5_vit_convert.yaml",
             "adapter": root / "image_projector/ckpt_convert/qwen_mlp_adapter_convert.yaml",
             "qwen3_vision": root / "image_encoder/ckpt_convert/qwen3_vit_convert.yaml"}
    from convert_checkpoint.config.family import CONFIG_ROOT

    source = open(os.path.join(CONFIG_ROOT, "qwen2.5/ckpt_convert/qwen2_5_convert.yaml")).read()
    for key, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source if key == "convert" else "vision_patch: {}\n")
    return {k: str(v) for k, v in paths.items()}


def test_loongforge_single_pass_vlm_flags(tiny_hf, tmp_path):
    """LoongForge's script: --convert_file (language model) + --vision_patch_convert_file +
    --adapter_convert_file + --encoder_tensor_model_parallel_size pick qwen2_5_vl both ways."""
    yamls = _loongforge_yamls(tmp_path)
    hf_dir = tiny_hf(QWEN25_VL)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    vlm = dict(convert_file=yamls["convert"], vision_patch_convert_file=yamls["vision"],
               adapter_convert_file=yamls["adapter"], encoder_tensor_model_parallel_size=1)
    assert hf_to_mcore(hf_dir, mcore, tensor_model_parallel_size=2, **vlm) == 0
    assert rank_files(mcore)["mp_rank_00"]["args"].convert_checkpoint_family == "qwen2_5_vl"
    assert mcore_to_hf(mcore, back, **vlm) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))


@pytest.mark.parametrize("which, fragments", [
    ("no_adapter", ["--vision_patch_convert_file and --adapter_convert_file go together"]),
    ("wrong_tower", ["does not go with a qwen2 language model"]),
    ("missing_adapter", ["--adapter_convert_file", "no such file"]),
])
def test_bad_loongforge_vlm_flags(tiny_hf, tmp_path, capsys, which, fragments):
    yamls = _loongforge_yamls(tmp_path)
    flags = dict(convert_file=yamls["convert"], vision_patch_convert_file=yamls["vision"],
                 adapter_convert_file=yamls["adapter"])
    if which == "no_adapter":
        del flags["adapter_convert_file"]
    elif which == "wrong_tower":
        flags["vision_patch_convert_file"] = yamls["qwen3_vision"]
    else:
        flags["adapter_convert_file"] = str(tmp_path / "nope.yaml")
    out, hf_dir = str(tmp_path / "out"), tiny_hf(QWEN25_VL)
    capsys.readouterr()  # the model's generation
    assert_fails(capsys, hf_to_mcore(hf_dir, out, **flags), out, *fragments)


# LoongForge's names for the tower (configs/models/image_encoder/ckpt_convert/qwen2_5_vit_convert.yaml
# and qwen3_vit_convert.yaml: name_map.mcore with layer_prefix vision_model.decoder.layers, TE-fused
# norms, plus vision_patch) and the merger (image_projector/ckpt_convert/qwen_mlp_adapter_convert.yaml,
# qwen_3_mlp_adapter_convert.yaml), after its prefix_mapping (vision_model -> encoder_model.image_encoder,
# adapter -> encoder_model.image_projector); `b` marks a bias next to the weight.
_LF_LAYER = {"self_attention.linear_qkv": "wb", "self_attention.linear_proj": "wb", "mlp.linear_fc1": "wb",
             "mlp.linear_fc2": "wb"}
_LF_TOWER = {
    "qwen2_5_vl": (["patch_embed.proj.weight"], ["layernorm.weight", "linear_fc1.weight", "linear_fc1.bias",
                                                 "linear_fc2.weight", "linear_fc2.bias"], False),
    "qwen3_vl": (["patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed.weight"]
                 + [f"deepstack_merger_list.{k}.{m}.{s}" for k in (0, 1) for m in ("linear_fc1", "linear_fc2", "layernorm")
                    for s in ("weight", "bias")],
                 ["layernorm.weight", "layernorm.bias", "linear_fc1.weight", "linear_fc1.bias",
                  "linear_fc2.weight", "linear_fc2.bias"], True),
}


@pytest.mark.parametrize("spec", [QWEN25_VL, QWEN3_VL], ids=lambda s: s.family)
def test_vision_names_are_loongforges(tiny_hf, tmp_path, spec):
    """TP 1, TE names: the encoder entries are exactly LoongForge's names for the tower, with the
    HF tensors' shapes (a 1:1 copy here, the qkv regrouping aside)."""
    mcore = str(tmp_path / "mcore")
    assert hf_to_mcore(tiny_hf(spec), mcore) == 0
    sd = rank_files(mcore)["mp_rank_00"]["model"]
    tower, merger, layer_norm_bias = _LF_TOWER[spec.family]
    expected = {ENC + n for n in tower} | {PROJ + n for n in merger}
    expected.add("encoder_model.text_encoder.word_embeddings.weight")
    for layer in range(3):
        head = f"{ENC}decoder.layers.{layer}."
        for module in _LF_LAYER:
            expected |= {f"{head}{module}.weight", f"{head}{module}.bias"}
        for fused in ("self_attention.linear_qkv", "mlp.linear_fc1"):
            expected.add(f"{head}{fused}.layer_norm_weight")
            if layer_norm_bias:
                expected.add(f"{head}{fused}.layer_norm_bias")
    found = {k for k, v in sd.items() if k.startswith("encoder_model.") and v is not None}
    assert found == expected, (sorted(found - expected)[:5], sorted(expected - found)[:5])
    hf = load_hf_tensors(tiny_hf(spec))
    visual = "visual." if spec.family == "qwen2_5_vl" else "model.visual."
    assert sd[ENC + "patch_embed.proj.weight"].shape == hf[visual + "patch_embed.proj.weight"].shape
    assert sd[ENC + "decoder.layers.0.self_attention.linear_qkv.weight"].shape == hf[visual + "blocks.0.attn.qkv.weight"].shape


def test_vit_flags(tiny_hf, tmp_path, capsys):
    """--vit_in_first_virtual_stage_only is what is written anyway; --enable-full-hetero-dp at PP > 1
    (LoongForge: a tower copy in every stage) is refused, at PP 1 it changes nothing."""
    hf_dir = tiny_hf(QWEN25_VL)
    out = str(tmp_path / "a")
    assert hf_to_mcore(hf_dir, out, pipeline_model_parallel_size=2, vit_in_first_virtual_stage_only=True) == 0
    assert not [k for k in rank_files(out)["mp_rank_00_001"]["model"] if k.startswith("encoder_model.")]
    assert hf_to_mcore(hf_dir, str(tmp_path / "b"), **{"enable-full-hetero-dp": True}) == 0
    capsys.readouterr()
    out = str(tmp_path / "c")
    rc = hf_to_mcore(hf_dir, out, pipeline_model_parallel_size=2, **{"enable-full-hetero-dp": True})
    assert_fails(capsys, rc, out, "--enable-full-hetero-dp", "not supported yet")


def test_torch_dist_output_is_refused(tiny_hf, tmp_path, capsys):
    out, hf_dir = str(tmp_path / "out"), tiny_hf(QWEN25_VL)
    capsys.readouterr()
    assert_fails(capsys, hf_to_mcore(hf_dir, out, ckpt_format="torch_dist"), out,
                 "--ckpt_format torch_dist", "vision-language model")


def test_loongforge_flags_pick_qwen3_vl_moe(tiny_hf, tmp_path):
    """LoongForge's Qwen3-VL-MoE script: qwen3_moe_convert_qwen3vl.yaml + qwen3_vit_convert.yaml."""
    yamls = _loongforge_yamls(tmp_path)
    convert = tmp_path / "loongforge/configs/models/qwen3/ckpt_convert/qwen3_moe_convert_qwen3vl.yaml"
    convert.parent.mkdir(parents=True, exist_ok=True)
    convert.write_text("defaults:\n  - qwen3@module: ???\n")
    mcore = str(tmp_path / "mcore")
    assert hf_to_mcore(tiny_hf(QWEN3_VL_MOE), mcore, convert_file=str(convert), expert_parallel_size=2,
                       vision_patch_convert_file=yamls["qwen3_vision"], adapter_convert_file=yamls["adapter"]) == 0
    assert rank_files(mcore)["mp_rank_00_000"]["args"].convert_checkpoint_family == "qwen3_vl_moe"


def test_virtual_stages_keep_the_tower_in_model0(tiny_hf, tmp_path):
    hf_dir = tiny_hf(QWEN3_VL)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(hf_dir, mcore, pipeline_model_parallel_size=2, custom_pipeline_layers="1,1,1,1",
                       **{"num-virtual-stages-per-pipeline-rank": 2}) == 0
    files = rank_files(mcore)
    for rank, ckpt in files.items():
        for chunk in ("model0", "model1"):
            has_tower = any(k.startswith("encoder_model.") for k in ckpt[chunk])
            assert has_tower == (rank == "mp_rank_00_000" and chunk == "model0"), (rank, chunk)
    assert mcore_to_hf(mcore, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))


def test_mcore_to_mcore_changes_tp_and_encoder_tp(tiny_hf, tmp_path):
    hf_dir = tiny_hf(QWEN25_VL)
    first, second, back = (str(tmp_path / n) for n in ("first", "second", "back"))
    assert hf_to_mcore(hf_dir, first, tensor_model_parallel_size=2, encoder_tensor_model_parallel_size=1,
                       pipeline_model_parallel_size=2, custom_pipeline_layers="1,3") == 0
    from helpers import convert

    assert convert("--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", first,
                   "--save_ckpt_path", second, tensor_model_parallel_size=4, encoder_tensor_model_parallel_size=2) == 0
    sd = rank_files(second)["mp_rank_03"]["model"]
    assert sd[ENC + "decoder.layers.0.self_attention.linear_qkv.weight"].shape == (48, 32)  # encoder shard 3 mod 2
    assert mcore_to_hf(second, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))


def test_dry_run_names_the_tower_placement(tiny_hf, tmp_path, capsys):
    out, hf_dir = str(tmp_path / "out"), tiny_hf(QWEN25_VL)
    capsys.readouterr()
    assert hf_to_mcore(hf_dir, out, tensor_model_parallel_size=2, encoder_tensor_model_parallel_size=1, dry_run=True) == 0
    assert "vision tower and merger (encoder_model.*): stage 0, chunk 0, encoder TP 1" in capsys.readouterr().out
    assert not os.path.exists(out) or not os.listdir(out)


def test_verify_compares_vl_checkpoints(tiny_hf, tmp_path, capsys):
    hf_dir = tiny_hf(QWEN3_VL_MOE)
    mcore = str(tmp_path / "mcore")
    assert hf_to_mcore(hf_dir, mcore, tensor_model_parallel_size=2, encoder_tensor_model_parallel_size=1,
                       expert_parallel_size=2) == 0
    from convert_checkpoint.cli import main

    capsys.readouterr()
    assert main(["verify", hf_dir, mcore]) == 0
    out = capsys.readouterr().out
    assert "vision_model.pos_embed.weight" in out and out.rstrip().endswith("identical")
    # one deepstack merger weight changed in the files of TP rank 0 (replicated tensors are read
    # from there): verify must say so (exit 1)
    for rank in ("mp_rank_00_000", "mp_rank_00_001"):
        path = os.path.join(mcore, "release", rank, "model_optim_rng.pt")
        ckpt = torch.load(path, weights_only=False)
        ckpt["model"][ENC + "deepstack_merger_list.1.linear_fc2.weight"][0, 0] += 1
        torch.save(ckpt, path)
    assert main(["verify", hf_dir, mcore]) == 1
