"""The families of issue 19: GLM-4.5 (glm4_moe), MiniMax-M2 (minimax_m2) and DeepSeek-V3.2
(deepseek_v32), each a convert YAML that ``extends:`` an older one. Bit-exact HF -> MCore -> HF
round trips over TP, PP (uneven), EP, ETP, grouped GEMM and TE/local names; the tensors each
family adds, where they land and how they split; the ``extends:`` merge rules and its errors."""
from __future__ import annotations

import json
import os

import pytest
import torch

from convert_checkpoint.config import extends
from convert_checkpoint.config.family import builtin_families, load_family
from convert_checkpoint.errors import ConversionError
from fixtures import assert_fails, layout_id, load_hf_tensors, round_trip_layout
from helpers import assert_same_tensors, hf_to_mcore, mcore_to_hf, rank_files
from tiny_models import TinySpec

GLM = TinySpec("glm4_moe", mtp_layers=1)  # published GLM-4.5: qkv biases, no q/k norms, one MTP layer
GLM_QK_NORM = TinySpec("glm4_moe", qk_norm=True, first_dense=0)  # use_qk_norm, every layer MoE
DSV32 = TinySpec("deepseek_v32", mtp_layers=1)
MINIMAX = TinySpec("minimax_m2")

# (tp, pp, custom layers, ep, etp or None, grouped, transformer_impl)
LAYOUTS = [
    (1, 1, None, 1, None, False, "transformer_engine"),
    (2, 1, None, 2, None, True, "local"),
    (2, 2, "3,1", 2, 1, False, "local"),
    (1, 2, "1,3", 2, None, True, "transformer_engine"),
    (2, 2, "1,3", 1, None, False, "transformer_engine"),
]


_layout_id, _round_trip = layout_id, round_trip_layout


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("spec", [GLM, GLM_QK_NORM, DSV32, MINIMAX], ids=lambda s: s.key.split("_untied")[0]
                         + ("-qknorm" if s.qk_norm else ""))
def test_round_trip_bit_exact(tiny_hf, tmp_path, spec, layout):
    files = _round_trip(tiny_hf(spec), tmp_path, layout)
    args = next(iter(files.values()))["args"]
    assert args.convert_checkpoint_family == spec.family


def test_bf16_round_trip_keeps_dtypes(tiny_hf, tmp_path):
    """bf16 GLM: every tensor back in its dtype; the router bias is fp32 in Megatron."""
    spec = TinySpec("glm4_moe", mtp_layers=1, dtype=torch.bfloat16)
    files = _round_trip(tiny_hf(spec), tmp_path, (2, 1, None, 2, None, False, "local"))
    sd = files["mp_rank_00_000"]["model"]
    assert sd["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
    assert sd["decoder.layers.1.self_attention.linear_qkv.weight"].dtype == torch.bfloat16


def _model(files: dict[str, dict], rank_dir: str) -> dict[str, torch.Tensor]:
    return files[rank_dir]["model"]


def test_glm_tensors_land_where_megatron_holds_them(tiny_hf, tmp_path):
    """qkv biases fused per query group and split by TP; partial RoPE recorded as rotary_percent;
    the DeepSeek-style MoE block and the MTP layer on the last stage; q/k norms only with use_qk_norm."""
    hf_dir = tiny_hf(GLM)
    hf = load_hf_tensors(hf_dir)
    files = _round_trip(hf_dir, tmp_path, (2, 2, "3,1", 1, None, False, "local"))
    first, last = _model(files, "mp_rank_01_000"), _model(files, "mp_rank_01_001")
    # 8 heads in 4 groups of head_dim 16: TP rank 1 holds groups 2, 3 = [q heads 4,5; k 2; v 2; q 6,7; k 3; v 3].
    q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv")
    want = torch.cat([q[64:96], k[32:48], v[32:48], q[96:128], k[48:64], v[48:64]])
    assert torch.equal(first["decoder.layers.1.self_attention.linear_qkv.bias"], want)
    assert not any("q_layernorm" in name or "k_layernorm" in name for name in first)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in first and "decoder.layers.0.mlp.router.weight" not in first
    assert torch.equal(first["decoder.layers.1.mlp.router.expert_bias"], hf["model.layers.1.mlp.gate.e_score_correction_bias"])
    gate, up = (hf[f"model.layers.1.mlp.shared_experts.{p}_proj.weight"].chunk(2)[1] for p in ("gate", "up"))
    assert torch.equal(first["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"], torch.cat([gate, up]))
    assert torch.equal(last["mtp.layers.0.eh_proj.weight"], hf["model.layers.4.eh_proj.weight"].chunk(2)[1])
    assert "mtp.layers.0.transformer_layer.self_attention.linear_qkv.bias" in last
    args = files["mp_rank_00_000"]["args"]
    assert (args.rotary_percent, args.add_qkv_bias, args.qk_layernorm, args.multi_latent_attention) == (0.5, True, False, False)
    assert (args.mtp_num_layers, args.moe_layer_freq, args.moe_router_enable_expert_bias) == (1, [0, 1, 1, 1], True)

    normed = load_hf_tensors(tiny_hf(GLM_QK_NORM))
    files = _round_trip(tiny_hf(GLM_QK_NORM), tmp_path / "qk", (2, 1, None, 1, None, False, "local"))
    sd = _model(files, "mp_rank_01")
    assert torch.equal(sd["decoder.layers.2.self_attention.q_layernorm.weight"], normed["model.layers.2.self_attn.q_norm.weight"])
    assert files["mp_rank_00"]["args"].qk_layernorm is True


def test_rotary_percent_is_absent_from_older_families_args(tiny_hf, tmp_path):
    """Fields added for these families stay out of other families' rank files (byte-identical output)."""
    files = _round_trip(tiny_hf(TinySpec("mixtral")), tmp_path, (1, 1, None, 1, None, False, "local"))
    args = files["mp_rank_00"]["args"]
    assert not hasattr(args, "rotary_percent") and not hasattr(args, "dsa_indexer_n_heads")
    assert "rotary_percent" not in args.convert_checkpoint_arch


def test_deepseek_v32_indexer_is_whole_on_every_tp_rank(tiny_hf, tmp_path):
    hf_dir = tiny_hf(DSV32)
    hf = load_hf_tensors(hf_dir)
    files = _round_trip(hf_dir, tmp_path, (2, 1, None, 1, None, False, "transformer_engine"))
    prefix = "decoder.layers.2.self_attention.core_attention.indexer."
    for rank in ("mp_rank_00", "mp_rank_01"):
        sd = _model(files, rank)
        for hf_name, mcore in [("wq_b.weight", "linear_wq_b.weight"), ("wk.weight", "linear_wk.weight"),
                               ("k_norm.weight", "k_norm.weight"), ("k_norm.bias", "k_norm.bias"),
                               ("weights_proj.weight", "linear_weights_proj.weight")]:
            assert torch.equal(sd[prefix + mcore], hf["model.layers.2.self_attn.indexer." + hf_name]), (rank, mcore)
        assert "mtp.layers.0.transformer_layer.self_attention.core_attention.indexer.linear_wk.weight" in sd
    args = files["mp_rank_00"]["args"]
    assert (args.experimental_attention_variant, args.dsa_indexer_n_heads, args.dsa_indexer_head_dim) == ("dsa", 4, 16)


def test_minimax_full_width_qk_norms_and_router_bias(tiny_hf, tmp_path):
    hf_dir = tiny_hf(MINIMAX)
    hf = load_hf_tensors(hf_dir)
    assert hf["model.layers.0.self_attn.q_norm.weight"].shape == (128,)  # heads x head_dim: not per head
    files = _round_trip(hf_dir, tmp_path, (2, 1, None, 2, 1, False, "local"))
    for rank in files:
        sd = _model(files, rank)
        assert torch.equal(sd["decoder.layers.3.self_attention.q_layernorm.weight"], hf["model.layers.3.self_attn.q_norm.weight"])
        assert torch.equal(sd["decoder.layers.3.self_attention.k_layernorm.weight"], hf["model.layers.3.self_attn.k_norm.weight"])
        bias = sd["decoder.layers.3.mlp.router.expert_bias"]
        assert bias.dtype == torch.float32 and torch.equal(bias, hf["model.layers.3.block_sparse_moe.e_score_correction_bias"])


def test_family_selection_and_fp8_marks():
    fams = builtin_families()
    assert {"glm4_moe", "minimax_m2", "deepseek_v32"} <= set(fams)
    # extends: the base's global modules, MTP and ignore list carry over unchanged.
    assert [m.options for m in fams["glm4_moe"].global_modules] == [m.options for m in fams["deepseek_v3"].global_modules]
    assert fams["glm4_moe"].ignore == fams["deepseek_v3"].ignore
    assert [m.options for m in fams["glm4_moe"].mtp.modules] == [m.options for m in fams["deepseek_v3"].mtp.modules]
    v3, v32 = fams["deepseek_v3"].layer_modules, fams["deepseek_v32"].layer_modules
    assert [m.options for m in v32[:len(v3)]] == [m.options for m in v3] and len(v32) == len(v3) + 5
    assert "q_lora_rank" not in fams["glm4_moe"].config_fields
    assert not fams["glm4_moe"].fixed_arch.get("multi_latent_attention")
    marked = {m.options["hf"] if isinstance(m.options["hf"], str) else m.options["hf"][0]
              for m in fams["minimax_m2"].layer_modules if m.options.get("dtype") == "fp8"}
    assert marked == {"self_attn.q_proj", "self_attn.o_proj.weight", "block_sparse_moe.experts.{expert}."}


# --- extends: merge rules and errors ---------------------------------------------------

def test_merge_patch_rules():
    base = {"a": {"x": 1, "y": 2}, "l": [1, 2], "k": "v"}
    assert extends.merge_patch(base, {"a": {"y": None, "z": 3}}) == {"a": {"x": 1, "z": 3}, "l": [1, 2], "k": "v"}
    assert extends.merge_patch(base, {"l": [9]})["l"] == [9]
    assert extends.merge_patch(base, {"l": [0, "@base", 3]})["l"] == [0, 1, 2, 3]
    assert extends.merge_patch(base, {"k": None}) == {"a": {"x": 1, "y": 2}, "l": [1, 2]}
    with pytest.raises(ConversionError, match="'k'.*no list"):
        extends.merge_patch(base, {"k": ["@base"]})


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("value,fragment", [
    ("no_such_family", "extends 'no_such_family', but there is no"),
    ("../llama", "'extends' must name a family directory"),
])
def test_extends_errors(tmp_path, value, fragment):
    path = _write(tmp_path / "x_convert.yaml", f"extends: {value}\nfamily: x\n")
    with pytest.raises(ConversionError, match=fragment.replace("(", r"\(")):
        load_family(path)


def test_extends_cycle(tmp_path, monkeypatch):
    root = tmp_path / "models"
    for a, b in (("a", "b"), ("b", "a")):
        (root / a / "ckpt_convert").mkdir(parents=True)
        _write(root / a / "ckpt_convert" / f"{a}_convert.yaml", f"extends: {b}\nfamily: {a}\n")
    monkeypatch.setattr("convert_checkpoint.config.family.CONFIG_ROOT", str(root))
    with pytest.raises(ConversionError, match="cycle"):
        load_family(str(root / "a" / "ckpt_convert" / "a_convert.yaml"))


def test_when_names_an_unknown_switch(tmp_path):
    text = open(builtin_families()["glm4_moe"].path).read().replace("when: qk_layernorm", "when: qk_norm_please", 1)
    path = _write(tmp_path / "glm_convert.yaml", text)
    with pytest.raises(ConversionError, match="'when' must be one of moe, dense, linear_attention, full_attention or a yes/no architecture field"):
        load_family(path)


def test_glm_with_q_norms_but_no_use_qk_norm_is_one_line(tiny_hf, tmp_path, capsys):
    """A checkpoint whose tensors disagree with its config (q/k norms present, use_qk_norm false)."""
    import shutil

    src = tiny_hf(GLM_QK_NORM)
    bad = tmp_path / "hf"
    shutil.copytree(src, bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["use_qk_norm"] = False
    json.dump(cfg, open(bad / "config.json", "w"))
    out = str(tmp_path / "out")
    capsys.readouterr()  # the tiny model's own save messages
    assert_fails(capsys, hf_to_mcore(str(bad), out), out, "unmapped tensor model.layers.0.self_attn.", "_norm.weight")


def test_deepseek_v32_indexer_matches_megatron_core_dsa_indexer(tiny_hf, tmp_path):
    """megatron-core 0.16 cannot build its DSA layer on this machine (its spec needs Transformer
    Engine's linear); the indexer module itself is built (tests/dsa_indexer_probe.py) and every
    rank file's indexer tensors, in each decoder and MTP layer, must have exactly its keys and shapes."""
    import subprocess
    import sys

    probe = os.path.join(os.path.dirname(__file__), "dsa_indexer_probe.py")
    # tiny_models: hidden 64, q-LoRA 32, indexer 4 heads of 16, rope dims 8
    proc = subprocess.run([sys.executable, probe, "64", "32", "4", "16", "8"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    megatron = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(megatron) == 5
    files = _round_trip(tiny_hf(DSV32), tmp_path, (2, 2, "3,1", 2, None, False, "transformer_engine"))
    seen = 0
    for rank, ckpt in files.items():
        sd = ckpt["model"]
        prefixes = {k.split("core_attention.indexer.")[0] for k in sd if "core_attention.indexer." in k}
        for prefix in prefixes:
            inner = {k[len(prefix) + len("core_attention.indexer."):]: v for k, v in sd.items()
                     if k.startswith(prefix + "core_attention.indexer.")}
            ours = {k: list(v.shape) for k, v in inner.items() if not k.endswith("._extra_state")}
            assert ours == megatron, (rank, prefix)
            # TE's Linear (what megatron's DSA spec builds them with) keeps an _extra_state each
            assert sorted(k for k in inner if k.endswith("._extra_state")) == [
                f"{m}._extra_state" for m in ("linear_weights_proj", "linear_wk", "linear_wq_b")], (rank, prefix)
            seen += 1
    assert seen == 4 * 3 + 4 * 2, seen  # 4 files of stage 0 with 3 layers, 4 of stage 1 with 1 layer + the MTP layer


def test_minimax_fp8_as_published_round_trip(tiny_hf, tmp_path):
    """MiniMax-M2's FP8 layout (128x128 blocks of the attention and expert matrices, scales in
    another shard) -> MCore FP8 parameters at TP2 EP2 ETP1 (TE names) -> HF FP8: codes, scales,
    every other tensor and quantization_config back bit for bit."""
    from convert_checkpoint.quant.te_pickle import Fp8BlockRecord
    from tiny_models import MINIMAX_FP8, make_fp8_checkpoint

    bf16 = tiny_hf(TinySpec("minimax_m2", wide=True, dtype=torch.bfloat16))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"), fp8=MINIMAX_FP8)
    src = load_hf_tensors(fp8)
    assert sum(v.dtype == torch.float8_e4m3fn for v in src.values()) == 4 * (4 + 4 * 3)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(fp8, mcore, tensor_model_parallel_size=2, expert_parallel_size=2, expert_tensor_parallel_size=1,
                       transformer_impl="transformer_engine", quant_method="pt", fp8_force_no_requant=True) == 0
    records = [n for ckpt in rank_files(mcore).values() for n, v in ckpt["model"].items() if isinstance(v, Fp8BlockRecord)]
    # per file: 4 layers x (qkv + proj + 2 local experts x (fc1 + fc2))
    assert len(records) == 2 * 4 * (2 + 2 * 2), len(records)
    assert mcore_to_hf(mcore, back, quant_method="pt") == 0
    assert_same_tensors(src, load_hf_tensors(back))
    cfg = json.load(open(os.path.join(back, "config.json")))
    assert cfg["quantization_config"] == json.load(open(os.path.join(fp8, "config.json")))["quantization_config"]


def test_deepseek_v32_indexer_sizes_that_disagree_with_config_are_one_line(tiny_hf, tmp_path, capsys):
    """config.json's index_head_dim must describe the indexer tensors: one line naming one, exit 2."""
    import shutil

    bad = tmp_path / "hf"
    shutil.copytree(tiny_hf(DSV32), bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["index_head_dim"] = 32
    json.dump(cfg, open(bad / "config.json", "w"))
    out = str(tmp_path / "out")
    capsys.readouterr()  # the tiny model's own save messages
    assert_fails(capsys, hf_to_mcore(str(bad), out), out, "tensor model.layers.0.self_attn.indexer.wq_b.weight has shape")


@pytest.mark.parametrize("spec", [GLM, DSV32, MINIMAX], ids=lambda s: s.family)
def test_verify_and_mcore_to_mcore(tiny_hf, tmp_path, capsys, spec):
    """`verify` finds HF and MCore (and MCore re-laid out MCore -> MCore) the same model."""
    from helpers import convert

    hf = tiny_hf(spec)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert hf_to_mcore(hf, a, tensor_model_parallel_size=2, expert_parallel_size=2, transformer_impl="local") == 0
    assert convert("--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", a, "--save_ckpt_path", b,
                   pipeline_model_parallel_size=2, custom_pipeline_layers="3,1", expert_parallel_size=4,
                   expert_tensor_parallel_size=1) == 0
    capsys.readouterr()
    for x, y in ((hf, a), (a, b), (hf, b)):
        assert convert("verify", x, y) == 0
        assert capsys.readouterr().out.strip().endswith("identical")


def test_extends_splice_without_a_base_list_names_the_file(tmp_path):
    path = _write(tmp_path / "x_convert.yaml", 'extends: mixtral\nfamily: x\ndescription: ["@base"]\n')
    with pytest.raises(ConversionError, match=r"x_convert\.yaml: 'description': \"@base\" splices"):
        load_family(path)


def test_megatron_training_checkpoint_of_v32_and_glm_converts_back(tiny_hf, tmp_path, capsys):
    """Rank files without our args (as Megatron training saves them, with its own --dsa-indexer-*
    and --rotary-percent args) convert back to the original HF tensors given only --convert_file."""
    from helpers import convert

    for spec in (DSV32, GLM):
        hf = tiny_hf(spec)
        mcore, back = str(tmp_path / f"{spec.family}_m"), str(tmp_path / f"{spec.family}_b")
        assert hf_to_mcore(hf, mcore, tensor_model_parallel_size=2, expert_parallel_size=2) == 0
        for rank, ckpt in rank_files(mcore).items():
            for name in [n for n in vars(ckpt["args"]) if n.startswith("convert_checkpoint_")]:
                delattr(ckpt["args"], name)
            torch.save(ckpt, os.path.join(mcore, "release", rank, "model_optim_rng.pt"))
        family = builtin_families()[spec.family]
        assert mcore_to_hf(mcore, back, convert_file=family.path, hf_config_path=None) == 0
        hf_tensors, back_tensors = load_hf_tensors(hf), load_hf_tensors(back)
        # Megatron keeps the router bias in fp32 and without our args nothing says it was otherwise
        assert_same_tensors(hf_tensors, back_tensors)
        assert convert("verify", hf, back) == 0


def test_minimax_published_rotary_dim_is_partial_rope():
    """MiniMax-M2's released config.json says ``rotary_dim`` (64 of head_dim 128), not
    ``partial_rotary_factor``: it becomes rotary_percent 0.5, as transformers reads it."""
    from transformers import MiniMaxM2Config

    family = builtin_families()["minimax_m2"]
    published = {"model_type": "minimax_m2", "architectures": ["MiniMaxM2ForCausalLM"], "hidden_size": 512,
                 "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                 "head_dim": 128, "rotary_dim": 64, "vocab_size": 1000, "num_local_experts": 4,
                 "num_experts_per_tok": 2, "rms_norm_eps": 1e-6, "rope_theta": 5e6}
    assert family.arch_from_config(published).rotary_percent == 0.5
    assert MiniMaxM2Config(**published).rope_parameters["partial_rotary_factor"] == 0.5
    stated = dict(published, partial_rotary_factor=0.25)  # an explicit factor wins, as in transformers
    assert family.arch_from_config(stated).rotary_percent == 0.25
