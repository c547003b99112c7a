"""LoongForge's own YAML files as --config_file / --convert_file (issue 14, items 2 and 3).

Its model YAML (flat Megatron argument names, ``_target_``, ``model_type``,
``${moe_freq:"..."}``) and convert YAML (``hydra``/``defaults``/``args``/``name_map``) are read
without Hydra: the model YAML is checked against config.json (never overriding it), the convert
YAML picks one of our families. The incumbent-path files we ship parse and describe the same
models as our own YAMLs."""
from __future__ import annotations

import glob
import json
import os

import pytest

from convert_checkpoint.config import loongforge as ly
from convert_checkpoint.config.arch import ModelArch, load_arch_yaml
from convert_checkpoint.config.family import CONFIG_ROOT, builtin_family_paths, family_by_name, load_family
from convert_checkpoint.config.resolve import from_hf_config
from convert_checkpoint.errors import ConversionError
from convert_checkpoint.requests import ModelRequest
from fixtures import assert_fails as _assert_fails
from fixtures import load_hf_tensors
from helpers import assert_same_tensors, hf_to_mcore, mcore_to_hf, rank_files
from tiny_models import TinySpec

SHIPPED = os.path.realpath(CONFIG_ROOT)


def shipped(rel: str) -> str:
    return os.path.join(SHIPPED, rel)


# ------------------------------------------------------------------------------------------
# YAML text in LoongForge's format, for the tiny models' dimensions (tests/tiny_models.py)

COMMON = """\
position_embedding_type: "rope"
add_position_embedding: false
rotary_interleaved: false
normalization: "RMSNorm"
norm_epsilon: 1e-6
swiglu: true
attention_dropout: 0.0
hidden_dropout: 0.0
add_bias_linear: false
add_qkv_bias: false
untie_embeddings_and_output_weights: true
"""

TINY = {
    "llama": """\
_target_: loongforge.models.foundation.LLaMAConfig
num_layers: 4
hidden_size: 64
ffn_hidden_size: 128
num_attention_heads: 8
vocab_size_in_config_file: 250
make_vocab_size_divisible_by: 128
group_query_attention: true
num_query_groups: 4
rotary_base: 10000
qk_layernorm: false
model_type: "llama"
convert_file: ${oc.env:LOONGFORGE_PATH}/configs/models/llama3/ckpt_convert/llama3_convert.yaml
""" + COMMON,
    "qwen3": """\
_target_: loongforge.models.foundation.Qwen3Config
num_layers: 4
hidden_size: 64
ffn_hidden_size: 128
num_attention_heads: 8
vocab_size_in_config_file: 250
group_query_attention: true
num_query_groups: 4
kv_channels: 16
qk_layernorm: true
rotary_emb_func: "RotaryEmbedding"
model_type: "qwen"
convert_file: ${oc.env:LOONGFORGE_PATH}/configs/models/qwen3/ckpt_convert/qwen3_convert.yaml
""" + COMMON,
    "qwen3_moe": """\
_target_: loongforge.models.foundation.Qwen3Config
num_layers: 4
hidden_size: 64
ffn_hidden_size: 128
num_attention_heads: 8
vocab_size_in_config_file: 250
group_query_attention: true
num_query_groups: 4
kv_channels: 16
qk_layernorm: true
num_experts: 4
moe_ffn_hidden_size: 32
moe_router_topk: 2
moe_grouped_gemm: true
moe_aux_loss_coeff: 0.001
model_type: "qwen"
convert_file: ${oc.env:LOONGFORGE_PATH}/configs/models/qwen3/ckpt_convert/qwen3_moe_convert.yaml
""" + COMMON,
    # DeepSeek-V3 shape: MLA (q-LoRA 32, kv-LoRA 16, heads of 16 + 8 rope, v 16), one dense
    # layer then MoE (the ${moe_freq:...} form), one shared expert of 32, router bias, MTP.
    "deepseek_v3": """\
_target_: loongforge.models.foundation.DeepseekConfig
num_layers: 4
hidden_size: 64
ffn_hidden_size: 128
num_attention_heads: 8
num_query_groups: 8
num_experts: 4
mtp_num_layers: 1
moe_ffn_hidden_size: 32
moe_shared_expert_intermediate_size: 32
q_lora_rank: 32
kv_lora_rank: 16
qk_head_dim: 16
qk_pos_emb_head_dim: 8
v_head_dim: 16
moe_layer_freq: ${moe_freq:"[0]*1+[1]*3"}
moe_router_enable_expert_bias: true
qk_layernorm: true
vocab_size_in_config_file: 250
apply_rope_fusion: true
multi_latent_attention: true
model_type: "deepseek"
convert_file: ${oc.env:LOONGFORGE_PATH}/configs/models/deepseek3/ckpt_convert/deepseek_v3_convert.yaml
""" + COMMON,
}
# Qwen2 / Qwen2.5: Llama's shape with q/k/v biases.
TINY["qwen2"] = (TINY["llama"].replace("add_qkv_bias: false", "add_qkv_bias: true")
                 .replace("LLaMAConfig", "Qwen2Config").replace('model_type: "llama"', 'model_type: "qwen"'))
# DeepSeek-V2-Lite shape: MLA without q-LoRA, softmax router (no bias), two shared experts of 32.
TINY["deepseek_v2"] = (TINY["deepseek_v3"].replace("mtp_num_layers: 1", "mtp_num_layers: null")
                       .replace("q_lora_rank: 32", "q_lora_rank: null")
                       .replace("moe_shared_expert_intermediate_size: 32", "moe_shared_expert_intermediate_size: 64")
                       .replace("moe_router_enable_expert_bias: true", "moe_router_enable_expert_bias: false")
                       .replace("deepseek3/ckpt_convert/deepseek_v3_convert.yaml",
                                "deepseek2/ckpt_convert/deepseek_v2_lite_convert.yaml"))
# Kimi-K2: DeepSeek-V3's layout, no MTP layer.
TINY["kimi_k2"] = (TINY["deepseek_v3"].replace("mtp_num_layers: 1", "mtp_num_layers: null")
                   .replace("deepseek3/ckpt_convert/deepseek_v3_convert.yaml", "kimi_k2/ckpt_convert/kimi_k2_convert.yaml"))

# A convert YAML in LoongForge's format: sizes by ${module.*} interpolation (and one literal).
CONVERT = """\
hydra:
  searchpath:
    - file://${{oc.env:LOONGFORGE_PATH}}/configs/models/
defaults:
  - {dir}@module: ???
  - _self_
args:
  common:
    num_layers: ${{module.num_layers}}
    hidden_size: ${{module.hidden_size}}
    ffn_hidden_size: ${{module.ffn_hidden_size}}
    num_attention_heads: ${{module.num_attention_heads}}
    num_key_value_heads: ${{module.num_query_groups}}
    vocab_size: {vocab}
{extra_common}  huggingface:
    some_switch: true
  mcore:
    untie_embeddings_and_output_weights: true
    transpose_query_key_value: true
name_map:
  huggingface:
    word_embeddings: model.embed_tokens
    layer_prefix: layers
{hf_names}  mcore:
    word_embeddings: embedding.word_embeddings
    layer_prefix: decoder.layers
torch_dtype: bfloat16
"""
NAMES = {
    "dense": "    attention.query_key_value:\n    - self_attn.q_proj\n    - self_attn.k_proj\n    - self_attn.v_proj\n"
             "    mlp.dense_4h_to_h: mlp.down_proj\n",
    "moe": "    attention.query_key_value:\n    - self_attn.q_proj\n    moe.gate: mlp.gate\n    moe.expert: mlp.experts\n",
    "mla": "    attention.q_down: self_attn.q_a_proj\n    attention.kv_down: self_attn.kv_a_proj_with_mqa\n"
           "    moe.gate: mlp.gate\n    moe.gate.bias: mlp.gate.e_score_correction_bias\n",
}


def write(path, text: str, **changes: str | None) -> str:
    """Write ``text`` with top-level ``key: value`` lines replaced (None: removed, new: appended)."""
    lines = text.splitlines()
    for key, value in changes.items():
        hit = [i for i, line in enumerate(lines) if line.startswith(f"{key}:")]
        if value is None:
            lines = [line for i, line in enumerate(lines) if i not in hit]
        elif hit:
            lines[hit[0]] = f"{key}: {value}"
        else:
            lines.append(f"{key}: {value}")
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def convert_yaml(root, dir_: str, name: str, names: str = "dense", vocab: str = "${module.vocab_size_in_config_file}",
                 extra_common: str = "") -> str:
    """``<root>/<dir>/ckpt_convert/<name>.yaml``, LoongForge's layout."""
    path = os.path.join(str(root), dir_, "ckpt_convert", f"{name}.yaml")
    text = CONVERT.format(dir=dir_, vocab=vocab, extra_common=extra_common, hf_names=NAMES[names])
    return write(path, text)


# ------------------------------------------------------------------------------------------
# The moe_freq list expression: a tiny parser, never eval


@pytest.mark.parametrize("text,expected", [
    ("[0]*3+[1]*58", [0] * 3 + [1] * 58),
    ("[1]", [1]),
    ("[0, 1]*2", [0, 1, 0, 1]),
    ("2*[1]+[0]", [1, 1, 0]),
    (" [0]*1 + [1]*3 ", [0, 1, 1, 1]),
    ("[1,0,]", [1, 0]),
    ("[0,0,1]+[1]*2+[0]", [0, 0, 1, 1, 1, 0]),
])
def test_moe_freq_parser(text, expected):
    assert ly.parse_layer_freq(text) == expected


@pytest.mark.parametrize("text", [
    "__import__('os').system('echo pwned')",
    "[__import__('os')]",
    "open('/etc/passwd')",
    "[0]*3+[1]*x",
    "[1]*10**9",
    "[1]*999999999",  # too long: refused before it is built
    "[1]*" + "9" * 900,
    "([0]*3)",
    "[0.5]",
    "[-1]",
    "[0]*3+",
    "[0]*[1]",
    "[1]*3*2",
    "[1] if True else [0]",
    "[1]; import os",
    "[\u0661]",  # a non-ASCII digit
    "",
    "[1]*2" + " " * 2000,
])
def test_moe_freq_parser_refuses(text):
    with pytest.raises(ValueError):
        ly.parse_layer_freq(text)


def test_moe_freq_in_yaml_malicious_is_refused(tmp_path):
    path = write(tmp_path / "m.yaml", TINY["deepseek_v3"], moe_layer_freq="""${moe_freq:"__import__('os').system('x')"}""")
    with pytest.raises(ConversionError, match="moe_layer_freq") as e:
        ly.arch_values(path)
    assert "list expression" in str(e.value)


def test_freq_text_round_trips():
    for pattern in ([0] * 3 + [1] * 58, [1, 0, 1], [1]):
        assert ly.parse_layer_freq(ly.freq_text(pattern)) == pattern


# ------------------------------------------------------------------------------------------
# Reading the model YAML


def test_detects_formats():
    assert ly.is_model_yaml_file(shipped("llama3/llama3_8b.yaml"))
    assert ly.is_convert_yaml_file(shipped("llama3/ckpt_convert/llama3_convert.yaml"))
    # ours: architecture YAML and family YAML
    assert not ly.is_model_yaml_file(shipped("llama/llama3_8b.yaml"))
    assert not ly.is_convert_yaml_file(shipped("llama/ckpt_convert/llama_convert.yaml"))
    assert not ly.is_convert_yaml_file(shipped("qwen3/ckpt_convert/qwen3_convert.yaml"))
    assert not ly.is_model_yaml({"norm_epsilon": 1e-5}) and ly.is_model_yaml({"model_type": "llama"})


def test_deepseek_v3_values(tmp_path):
    values = ly.arch_values(write(tmp_path / "ds.yaml", TINY["deepseek_v3"]))
    assert values == dict(
        family="deepseek_v3", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
        num_query_groups=8, kv_channels=16, num_experts=4, mtp_num_layers=1, moe_ffn_hidden_size=32,
        shared_expert_ffn_hidden_size=32, num_shared_experts=1, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16,
        qk_pos_emb_head_dim=8, v_head_dim=16, moe_layer_pattern=(0, 1, 1, 1), router_expert_bias=True,
        qk_layernorm=True, vocab_size=250, multi_latent_attention=True, normalization="RMSNorm", norm_epsilon=1e-6,
        add_qkv_bias=False, tied_embeddings=False)
    ModelArch.from_dict({**values, **family_by_name("deepseek_v3").fixed_arch}, "test")  # a complete architecture


def test_group_query_attention_false_means_one_group_per_head(tmp_path):
    path = write(tmp_path / "m.yaml", TINY["llama"], group_query_attention="false", num_query_groups=None)
    assert ly.arch_values(path)["num_query_groups"] == 8
    # Megatron ignores num_query_groups without group_query_attention
    path = write(tmp_path / "m.yaml", TINY["llama"], group_query_attention="false", num_query_groups="2")
    assert ly.arch_values(path)["num_query_groups"] == 8
    path = write(tmp_path / "m.yaml", TINY["llama"], num_query_groups=None)
    with pytest.raises(ConversionError, match="group_query_attention is true but num_query_groups is not given"):
        ly.arch_values(path)


def test_untie_and_kv_channels_and_moe_freq_forms(tmp_path):
    values = ly.arch_values(write(tmp_path / "m.yaml", TINY["llama"], untie_embeddings_and_output_weights="false"))
    assert values["tied_embeddings"] is True and values["kv_channels"] == 8  # hidden / heads
    for freq, pattern in (("1", None), ('"[0]*2+[1]*2"', (0, 0, 1, 1)), ("[0, 1, 1, 1]", (0, 1, 1, 1)), ("2", (1, 0, 1, 0))):
        values = ly.arch_values(write(tmp_path / "m.yaml", TINY["deepseek_v3"], moe_layer_freq=freq))
        assert values["moe_layer_pattern"] == pattern, freq
    path = write(tmp_path / "m.yaml", TINY["deepseek_v3"], moe_layer_freq='${moe_freq:"[0]*1+[1]*5"}')
    with pytest.raises(ConversionError, match="moe_layer_freq lists 6 layers, but num_layers is 4"):
        ly.arch_values(path)


def test_training_only_keys_are_ignored(tmp_path):
    extra = dict(apply_rope_fusion="true", bias_swiglu_fusion="true", masked_softmax_fusion="true",
                 recompute_granularity="selective", moe_router_topk="8", moe_token_dispatcher_type="alltoall",
                 moe_router_load_balancing_type="seq_aux_loss", init_method_std="0.02", seq_length="4096",
                 attention_softmax_in_fp32="true", tokenizer_model="${oc.env:TOKENIZER_PATH}/tok.model",
                 rotary_scaling_factor="40", mscale="1.0", make_vocab_size_divisible_by="128",
                 convert_file="${oc.env:NOT_SET_ANYWHERE}/x.yaml")
    values = ly.arch_values(write(tmp_path / "m.yaml", TINY["llama"], **extra))
    assert values["num_layers"] == 4 and values["family"] is not None


@pytest.mark.parametrize("key,value,fragment", [
    ("hidden_heads", "8", "unknown key 'hidden_heads'"),
    ("sliding_window", "4096", "unknown key 'sliding_window'"),
    ("swiglu", "false", "swiglu false is not supported"),
    ("add_bias_linear", "true", "add_bias_linear true is not supported"),
    ("hidden_size", '"64"', "hidden_size must be an integer"),
    ("qk_layernorm", "1", "qk_layernorm must be true or false"),
])
def test_bad_model_keys(tmp_path, key, value, fragment):
    with pytest.raises(ConversionError, match=fragment):
        ly.arch_values(write(tmp_path / "m.yaml", TINY["llama"], **{key: value}))


@pytest.mark.parametrize("key,value", [
    ("hidden_size", "${module.hidden_size}"),
    ("num_layers", "${oc.env:NUM_LAYERS}"),
    ("ffn_hidden_size", "${oc.select:ffn,128}"),
    ("num_query_groups", "${num_attention_heads}"),
    ("moe_layer_freq", '${moe_layers:"[1]*4"}'),
])
def test_unsupported_interpolation_names_the_key(tmp_path, key, value):
    path = write(tmp_path / "m.yaml", TINY["deepseek_v3"], **{key: value})
    with pytest.raises(ConversionError, match=f"{key}: .* is an OmegaConf interpolation we do not evaluate"):
        ly.arch_values(path)


def test_family_from_model_yaml(tmp_path):
    assert ly.family_name(write(tmp_path / "a.yaml", TINY["qwen3_moe"])) == "qwen3_moe"
    # without convert_file: _target_ / model_type and the sizes
    assert ly.family_name(write(tmp_path / "b.yaml", TINY["qwen3_moe"], convert_file=None)) == "qwen3_moe"
    assert ly.family_name(write(tmp_path / "c.yaml", TINY["qwen3"], convert_file=None)) == "qwen3"
    assert ly.family_name(write(tmp_path / "d.yaml", TINY["llama"], convert_file=None)) == "llama"
    assert ly.family_name(write(tmp_path / "e.yaml", TINY["deepseek_v3"], convert_file=None)) == "deepseek_v3"
    assert ly.family_name(write(tmp_path / "f.yaml", TINY["kimi_k2"])) == "deepseek_v3"
    path = write(tmp_path / "g.yaml", TINY["deepseek_v3"], convert_file=None, moe_router_enable_expert_bias=None,
                 mtp_num_layers=None)
    with pytest.raises(ConversionError, match="cannot tell the model family"):
        ly.family_name(path)  # DeepSeek-V2 or V3: the YAML does not say


# ------------------------------------------------------------------------------------------
# Reading the convert YAML: which of our families


@pytest.mark.parametrize("dir_,name,names,family", [
    ("llama3", "llama3_convert", "dense", "llama"),
    ("llama2", "llama2_convert", "dense", "llama"),
    ("qwen2.5", "qwen2_5_convert", "dense", "qwen2"),
    ("qwen3", "qwen3_convert", "dense", "qwen3"),
    ("qwen3", "qwen3_moe_convert", "moe", "qwen3_moe"),
    ("qwen3", "my_qwen3_variant", "moe", "qwen3_moe"),  # unknown file name: defaults + name_map decide
    ("qwen3", "my_qwen3_variant", "dense", "qwen3"),
    ("deepseek2", "deepseek_v2_lite_convert", "mla", "deepseek_v2"),
    ("deepseek3", "deepseek_v3_convert", "mla", "deepseek_v3"),
    ("kimi_k2", "kimi_k2_convert", "mla", "deepseek_v3"),
    ("kimi_k2", "kimi_k2_convert_bf16", "mla", "deepseek_v3"),
    ("deepseek3", "deepseek_v3_2_convert", "mla", "deepseek_v32"),
    ("minimax", "minimax_convert", "moe", "minimax_m2"),
])
def test_convert_yaml_family(tmp_path, dir_, name, names, family):
    path = convert_yaml(tmp_path, dir_, name, names)
    assert ly.family_name(path) == family
    assert load_family(path).name == family


@pytest.mark.parametrize("dir_,name,fragment", [
    ("deepseek4", "deepseek_v4_convert", "DeepSeek-V4"),
    ("glm5", "glm5_convert", "GLM-5"),
    ("qwen3.5", "qwen3_5_moe_convert", "Qwen3.5-MoE"),
    ("internlm2.5", "my_internlm", "InternLM2.5"),
    ("somewhere", "something_convert", "cannot tell which family"),
])
def test_unsupported_convert_yaml_is_one_error(tmp_path, dir_, name, fragment):
    path = convert_yaml(tmp_path, dir_, name)
    with pytest.raises(ConversionError, match=fragment):
        load_family(path)


def test_name_map_must_fit_the_family(tmp_path):
    with pytest.raises(ConversionError, match="name_map shows a MoE model, but it names our llama family"):
        load_family(convert_yaml(tmp_path, "llama3", "llama3_convert", "moe"))
    with pytest.raises(ConversionError, match="multi-latent attention"):
        load_family(convert_yaml(tmp_path, "qwen3", "qwen3_moe_convert", "mla"))


def test_convert_yaml_unknown_top_key(tmp_path):
    path = convert_yaml(tmp_path, "llama3", "llama3_convert")
    with open(path, "a") as f:
        f.write("extra_section: {a: 1}\n")
    with pytest.raises(ConversionError, match="unknown key\\(s\\) extra_section"):
        ly.read_convert_yaml(path)


def test_arch_values_with_convert_args(tmp_path):
    model = write(tmp_path / "m.yaml", TINY["llama"])
    values = ly.arch_values(model, convert_yaml(tmp_path, "llama3", "llama3_convert", vocab="250"))
    assert values["vocab_size"] == 250 and values["family"] == "llama"
    with pytest.raises(ConversionError, match="args.common.vocab_size 128256, but --config_file .* has vocab_size_in_config_file 250"):
        ly.arch_values(model, convert_yaml(tmp_path, "llama3", "llama3_convert", vocab="128256"))


def test_wrong_file_for_the_flag(tmp_path):
    with pytest.raises(ConversionError, match="is a LoongForge convert YAML; pass it as --convert_file"):
        load_arch_yaml(convert_yaml(tmp_path, "llama3", "llama3_convert"))
    with pytest.raises(ConversionError, match="is a LoongForge model YAML; pass it as --config_file"):
        load_family(write(tmp_path / "m.yaml", TINY["llama"]))


# ------------------------------------------------------------------------------------------
# Conversions: HF -> MCore -> HF bit-exact with LoongForge's YAMLs given, as its scripts do

CASES = {
    # tiny spec, model YAML, convert YAML (tmp: written in LoongForge's layout; else shipped), flags
    "llama-tmp-convert": (TinySpec("llama"), "llama", ("llama3", "llama3_convert", "dense", "250"),
                          dict(tensor_model_parallel_size=2)),
    "llama-shipped-convert": (TinySpec("llama"), "llama", "llama3/ckpt_convert/llama3_convert.yaml",
                              dict(pipeline_model_parallel_size=2)),
    "qwen3-ours-at-its-path": (TinySpec("qwen3"), "qwen3", "qwen3/ckpt_convert/qwen3_convert.yaml",
                               dict(tensor_model_parallel_size=2)),
    "qwen3_moe-shipped-convert": (TinySpec("qwen3_moe"), "qwen3_moe", "qwen3/ckpt_convert/qwen3_moe_convert.yaml",
                                  dict(expert_parallel_size=2, **{"moe-grouped-gemm": True})),
    "deepseek_v3-tmp-convert": (TinySpec("deepseek_v3", mtp_layers=1), "deepseek_v3",
                                ("deepseek3", "deepseek_v3_convert", "mla", "${module.vocab_size_in_config_file}"),
                                dict(tensor_model_parallel_size=2, expert_parallel_size=2, mtp_num_layers=1)),
    "deepseek_v3-shipped-convert": (TinySpec("deepseek_v3", mtp_layers=1), "deepseek_v3",
                                    "deepseek3/ckpt_convert/deepseek_v3_convert.yaml", dict(pipeline_model_parallel_size=2)),
    "kimi_k2-shipped-convert": (TinySpec("deepseek_v3"), "kimi_k2", "kimi_k2/ckpt_convert/kimi_k2_convert.yaml",
                                dict(expert_parallel_size=4)),
    # Every other family LoongForge ships a convert YAML for, with the one shipped at its path.
    "llama2-shipped-convert": (TinySpec("llama"), "llama", "llama2/ckpt_convert/llama2_convert.yaml",
                               dict(tensor_model_parallel_size=2)),
    "llama3_1-shipped-convert": (TinySpec("llama"), "llama", "llama3/ckpt_convert/llama3_1_convert.yaml", {}),
    "qwen2-ours-at-its-path": (TinySpec("qwen2"), "qwen2", "qwen2/ckpt_convert/qwen2_convert.yaml",
                               dict(tensor_model_parallel_size=2)),
    "qwen2_5-shipped-convert": (TinySpec("qwen2"), "qwen2", "qwen2.5/ckpt_convert/qwen2_5_convert.yaml",
                                dict(pipeline_model_parallel_size=2)),
    "deepseek_v2_lite-shipped-convert": (TinySpec("deepseek_v2"), "deepseek_v2",
                                         "deepseek2/ckpt_convert/deepseek_v2_lite_convert.yaml",
                                         dict(tensor_model_parallel_size=2, expert_parallel_size=2)),
    "deepseek_v2-shipped-convert": (TinySpec("deepseek_v2"), "deepseek_v2", "deepseek2/ckpt_convert/deepseek_v2_convert.yaml",
                                    dict(expert_parallel_size=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_with_loongforge_yamls(tiny_hf, tmp_path, case):
    spec, model, conv, flags = CASES[case]
    hf = tiny_hf(spec)
    config_file = write(tmp_path / "lf" / "model.yaml", TINY[model])
    if isinstance(conv, tuple):
        dir_, name, names, vocab = conv
        extra = "    num_experts: ${module.num_experts}\n    mtp_num_layers: ${module.mtp_num_layers}\n" if names == "mla" else ""
        convert_file = convert_yaml(tmp_path / "lf", dir_, name, names, vocab, extra)
    else:
        convert_file = shipped(conv)
    yamls = dict(config_file=config_file, convert_file=convert_file)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(hf, mcore, **yamls, **flags) == 0
    assert mcore_to_hf(mcore, back, **yamls) == 0  # its mcore_to_hf scripts pass both YAMLs too
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back))
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf, "config.json")))


@pytest.mark.parametrize("changes,fragment", [
    (dict(hidden_size="128"), "hidden_size 128, but config.json has 64"),
    (dict(ffn_hidden_size="256"), "ffn_hidden_size 256, but config.json has intermediate_size 128"),
    (dict(num_query_groups="2"), "num_query_groups 2, but config.json has num_key_value_heads 4"),
    (dict(vocab_size_in_config_file="128256"), "vocab_size_in_config_file 128256, but config.json has vocab_size 250"),
    (dict(untie_embeddings_and_output_weights="false"),
     "untie_embeddings_and_output_weights false, but config.json has tie_word_embeddings false"),
    (dict(rotary_base="500000"), "rotary_base 500000, but config.json has rope_theta 10000"),
    (dict(num_experts="8"), "num_experts 8, but config.json has no num_experts"),
    (dict(qk_layernorm="true"), "qk_layernorm true, but the llama family has false"),
    (dict(hidden_size="${module.hidden_size}"), "hidden_size: '${module.hidden_size}' is an OmegaConf interpolation"),
])
def test_model_yaml_disagreeing_with_config_json(tiny_hf, tmp_path, capsys, changes, fragment):
    path = write(tmp_path / "m.yaml", TINY["llama"], **changes)
    out = str(tmp_path / "out")
    rc = hf_to_mcore(tiny_hf(TinySpec("llama")), out, config_file=path,
                     convert_file=shipped("llama3/ckpt_convert/llama3_convert.yaml"))
    _assert_fails(capsys, rc, out, f"--config_file {path}: {fragment}")


def test_mismatches_name_each_key_once(tiny_hf, tmp_path, capsys):
    path = write(tmp_path / "m.yaml", TINY["llama"], hidden_size="128", num_layers="32")
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(tiny_hf(TinySpec("llama")), out, config_file=path), out,
                  "num_layers 32, but config.json has num_hidden_layers 4 (also differ: hidden_size)")


def test_moe_freq_disagreeing_with_config_json(tiny_hf, tmp_path, capsys):
    path = write(tmp_path / "m.yaml", TINY["deepseek_v3"], moe_layer_freq='${moe_freq:"[0]*2+[1]*2"}')
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(tiny_hf(TinySpec("deepseek_v3", mtp_layers=1)), out, config_file=path), out,
                  "moe_layer_freq [0]*2+[1]*2, but config.json implies [0]*1+[1]*3")


def test_convert_yaml_args_disagreeing_with_config_json(tiny_hf, tmp_path, capsys):
    conv = convert_yaml(tmp_path, "llama3", "llama3_convert", vocab="128256")
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(tiny_hf(TinySpec("llama")), out, convert_file=conv), out,
                  f"--convert_file {conv}: args.common.vocab_size 128256, but config.json has vocab_size 250")


def test_unsupported_family_through_the_cli(tiny_hf, tmp_path, capsys):
    conv = convert_yaml(tmp_path, "deepseek4", "deepseek_v4_convert", "mla")
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(tiny_hf(TinySpec("llama")), out, convert_file=conv), out,
                  "deepseek_v4_convert is for DeepSeek-V4, which we do not convert")


def test_our_architecture_yaml_still_overrides(tiny_hf, tmp_path):
    """Our own format keeps its override semantics (only LoongForge's is a cross-check)."""
    arch = tmp_path / "arch.yaml"
    arch.write_text("norm_epsilon: 1.0e-5\n")
    out = str(tmp_path / "m")
    assert hf_to_mcore(tiny_hf(TinySpec("llama")), out, config_file=str(arch),
                       convert_file=shipped("llama3/ckpt_convert/llama3_convert.yaml")) == 0
    assert rank_files(out)["mp_rank_00"]["args"].norm_epsilon == 1e-5


# ------------------------------------------------------------------------------------------
# The files we ship at LoongForge's paths

REQUIRED = [
    "llama3/llama3_8b.yaml", "llama3/llama3_1_8b.yaml", "llama3/ckpt_convert/llama3_convert.yaml",
    "llama2/llama2_7b.yaml", "llama2/ckpt_convert/llama2_convert.yaml",
    "qwen2/qwen2_7b.yaml", "qwen2/ckpt_convert/qwen2_convert.yaml",
    "qwen2.5/qwen2_5_7b.yaml", "qwen2.5/ckpt_convert/qwen2_5_convert.yaml",
    "qwen3/qwen3_8b.yaml", "qwen3/qwen3_30b_a3b.yaml", "qwen3/qwen3_235b_a22b.yaml",
    "qwen3/ckpt_convert/qwen3_convert.yaml", "qwen3/ckpt_convert/qwen3_moe_convert.yaml",
    "deepseek2/deepseek_v2_lite.yaml", "deepseek2/ckpt_convert/deepseek_v2_lite_convert.yaml",
    "deepseek3/deepseek_v3.yaml", "deepseek3/ckpt_convert/deepseek_v3_convert.yaml",
    "kimi_k2/kimi_k2.yaml", "kimi_k2/ckpt_convert/kimi_k2_convert.yaml",
]
OURS = {"deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe", "gpt_oss", "llama", "minimax_m2", "mixtral", "qwen2", "qwen2_moe", "qwen3",
        "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}


def _all_yamls() -> list[str]:
    return sorted(os.path.relpath(p, SHIPPED) for p in glob.glob(os.path.join(SHIPPED, "**", "*.yaml"), recursive=True))


def test_incumbent_paths_exist():
    missing = [rel for rel in REQUIRED if not os.path.isfile(shipped(rel))]
    assert not missing, missing


def test_family_glob_skips_loongforge_files():
    families = {os.path.relpath(p, SHIPPED) for p in builtin_family_paths()}
    assert families == {f"{name}/ckpt_convert/{name}_convert.yaml" for name in OURS}


@pytest.mark.parametrize("rel", [r for r in _all_yamls() if ly.is_model_yaml_file(os.path.join(SHIPPED, r))])
def test_shipped_model_yaml(rel):
    """Parses to a complete architecture of the family its convert_file names; that file is ours too."""
    path = shipped(rel)
    values = ly.arch_values(path)
    family = family_by_name(ly.family_name(path))
    assert values["family"] == family.name
    arch = ModelArch.from_dict({**values, **family.fixed_arch}, rel)
    assert arch.max_position_embeddings and arch.rotary_base and arch.norm_epsilon
    convert_file = ly.read_model_yaml(path).raw["convert_file"]
    prefix = "${oc.env:LOONGFORGE_PATH}/configs/models/"
    assert convert_file.startswith(prefix), convert_file
    target = shipped(convert_file[len(prefix):])
    assert os.path.isfile(target), convert_file
    assert load_family(target).name == family.name
    assert rel.split("/")[0] == convert_file[len(prefix):].split("/")[0]  # same directory, as LoongForge has them


@pytest.mark.parametrize("rel", [r for r in _all_yamls() if ly.is_convert_yaml_file(os.path.join(SHIPPED, r))])
def test_shipped_convert_yaml(rel):
    assert "/ckpt_convert/" in rel
    assert load_family(shipped(rel)).name in OURS


@pytest.mark.parametrize("theirs,ours", [
    ("llama3/llama3_8b.yaml", "llama/llama3_8b.yaml"),
    ("qwen2.5/qwen2_5_7b.yaml", "qwen2/qwen2_5_7b.yaml"),
])
def test_shipped_yaml_agrees_with_our_flagship(theirs, ours):
    values, own = ly.arch_values(shipped(theirs)), load_arch_yaml(shipped(ours))
    assert not ly.is_model_yaml_file(shipped(ours))
    common = sorted(set(values) & set(own))
    assert len(common) >= 10, common
    assert {k: values[k] for k in common} == {k: own[k] for k in common}


# config.json of the published models (the keys our family YAMLs read).
PUBLISHED = {
    "llama3/llama3_8b.yaml": dict(
        model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        max_position_embeddings=8192),
    "llama2/llama2_7b.yaml": dict(
        model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        max_position_embeddings=4096),
    "qwen2.5/qwen2_5_7b.yaml": dict(
        model_type="qwen2", num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        max_position_embeddings=131072),
    "qwen3/qwen3_30b_a3b.yaml": dict(
        model_type="qwen3_moe", num_hidden_layers=48, hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, max_position_embeddings=40960, num_experts=128, moe_intermediate_size=768,
        decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseek3/deepseek_v3.yaml": dict(
        model_type="deepseek_v3", num_hidden_layers=61, hidden_size=7168, intermediate_size=18432,
        num_attention_heads=128, num_key_value_heads=128, vocab_size=129280, rms_norm_eps=1e-6, rope_theta=10000,
        tie_word_embeddings=False, max_position_embeddings=163840, n_routed_experts=256, moe_intermediate_size=2048,
        n_shared_experts=1, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, first_k_dense_replace=3, num_nextn_predict_layers=1),
    "kimi_k2/kimi_k2.yaml": dict(
        model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], num_hidden_layers=61, hidden_size=7168,
        intermediate_size=18432, num_attention_heads=64, num_key_value_heads=64, vocab_size=163840, rms_norm_eps=1e-6,
        rope_theta=50000.0, tie_word_embeddings=False, max_position_embeddings=131072, n_routed_experts=384,
        moe_intermediate_size=2048, n_shared_experts=1, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1, num_nextn_predict_layers=0),
    "deepseek2/deepseek_v2_lite.yaml": dict(
        model_type="deepseek_v2", num_hidden_layers=27, hidden_size=2048, intermediate_size=10944,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=102400, rms_norm_eps=1e-6, rope_theta=10000,
        tie_word_embeddings=False, max_position_embeddings=163840, n_routed_experts=64, moe_intermediate_size=1408,
        n_shared_experts=2, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, first_k_dense_replace=1),
}


@pytest.mark.parametrize("rel", list(PUBLISHED))
def test_shipped_yamls_pass_the_cross_check_with_the_published_config(rel):
    config_file = shipped(rel)
    convert_file = ly.read_model_yaml(config_file).raw["convert_file"].replace("${oc.env:LOONGFORGE_PATH}/configs/models/", "")
    family, arch = from_hf_config(PUBLISHED[rel], ModelRequest(config_file, shipped(convert_file)))
    assert family.name == ly.family_name(config_file)
    assert arch.num_layers == PUBLISHED[rel]["num_hidden_layers"]
    # and a wrong one is caught: every stated size counts
    wrong = dict(PUBLISHED[rel], num_attention_heads=PUBLISHED[rel]["num_attention_heads"] * 2)
    with pytest.raises(ConversionError, match="num_attention_heads"):
        from_hf_config(wrong, ModelRequest(config_file, shipped(convert_file)))
