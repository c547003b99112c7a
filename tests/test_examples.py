"""Every example script runs, with its own flags, on a tiny model of its family."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fixtures import load_hf_tensors
from helpers import assert_same_tensors, bits, hf_to_mcore, mcore_to_hf, rank_files
from tiny_models import TinySpec, make_fp8_checkpoint

from convert_checkpoint.quant.fp8_block import quantize_blocks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scaled-down parallel sizes where the script's defaults exceed the tiny model (4 layers,
# 8 heads, 4 experts); the flags themselves are the script's.
DEEPSEEK_SCALED = {"TP": "2", "PP": "2", "PIPELINE_LAYERS": "3,1", "EP": "4", "ETP": "1"}
EXAMPLES = {
    "llama3_8b": (TinySpec("llama"), {}),
    "qwen2_5_7b": (TinySpec("qwen2"), {}),
    "qwen3_8b": (TinySpec("qwen3"), {}),
    "qwen3_30b_a3b": (TinySpec("qwen3_moe"), {}),
    "mixtral_8x7b": (TinySpec("mixtral"), {}),
    "deepseek_v3": (TinySpec("deepseek_v3", mtp_layers=1), DEEPSEEK_SCALED),
    "kimi_k2": (TinySpec("deepseek_v3", mtp_layers=0), DEEPSEEK_SCALED),
    "deepseek_v2_lite": (TinySpec("deepseek_v2"), {"PIPELINE_LAYERS": "1,3", "EP": "2"}),
    "glm4_moe": (TinySpec("glm4_moe", mtp_layers=1), {"TP": "2", "PP": "2", "PIPELINE_LAYERS": "1,3", "EP": "4"}),
    "minimax_m2": (TinySpec("minimax_m2"), {"TP": "2", "PP": "2", "PIPELINE_LAYERS": "3,1", "EP": "4"}),
    "deepseek_v32": (TinySpec("deepseek_v32", mtp_layers=1), DEEPSEEK_SCALED),
    "gpt_oss": (TinySpec("gpt_oss", dtype=torch.bfloat16), {"TP": "2", "PP": "2", "PIPELINE_LAYERS": "3,1", "EP": "4"}),
    "qwen3_next": (TinySpec("qwen3_next", full_attention=(1, 3)), {"PIPELINE_LAYERS": "1,3", "PP": "2", "EP": "4"}),
    "qwen2_5_vl": (TinySpec("qwen2_5_vl"), {"TP": "2", "ENCODER_TP": "1", "PP": "2", "PIPELINE_LAYERS": "1,3"}),
    "qwen3_vl": (TinySpec("qwen3_vl"), {"TP": "2", "ENCODER_TP": "2", "PP": "2", "PIPELINE_LAYERS": "1,3"}),
}


FP8_SCRIPTS = {"hf_fp8_to_mcore_fp8.sh", "mcore_fp8_to_hf_fp8.sh", "mcore_bf16_to_hf_fp8.sh"}


def test_every_example_directory_is_tested():
    assert sorted(d for d in os.listdir(os.path.join(REPO, "examples"))
                  if os.path.isdir(os.path.join(REPO, "examples", d)) and not d.startswith("__")) == sorted([*EXAMPLES, "converters", "loongforge"])
    # examples/converters holds the custom-converter example, run by test_converters.py
    assert {f for f in os.listdir(os.path.join(REPO, "examples", "converters")) if not f.startswith("__")} == {"cast_dtype.py"}
    # examples/loongforge holds LoongForge's documentation scripts, run by test_loongforge_scripts.py
    assert set(os.listdir(os.path.join(REPO, "examples", "loongforge"))) == {
        "deepseek_v3_1_hf_fp8_to_mcore_fp8.sh", "deepseek_v3_1_mcore_fp8_to_hf_fp8.sh"}
    for example in EXAMPLES:  # each script is run below
        extra = FP8_SCRIPTS if example == "deepseek_v3" else set()
        assert set(os.listdir(os.path.join(REPO, "examples", example))) == {"hf_to_mcore.sh", "mcore_to_hf.sh"} | extra


def _run(script: str, env: dict) -> None:
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "deepseek_v3", script), "--no_progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_deepseek_v3_fp8_scripts(tiny_hf, tmp_path):
    """hf_fp8 -> mcore_fp8 -> hf_fp8 is bit-exact; mcore_bf16 -> hf_fp8 quantizes the marked tensors."""
    bf16 = tiny_hf(TinySpec("deepseek_v3", mtp_layers=1, wide=True, dtype=torch.bfloat16))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"))
    env = dict(os.environ, PYTHON=sys.executable, MAX_WORKERS="2", **DEEPSEEK_SCALED)
    _run("hf_fp8_to_mcore_fp8.sh", dict(env, HF_CKPT_PATH=fp8, MCORE_CKPT_PATH=str(tmp_path / "mc_fp8")))
    _run("mcore_fp8_to_hf_fp8.sh", dict(env, HF_CKPT_PATH=str(tmp_path / "back"), MCORE_CKPT_PATH=str(tmp_path / "mc_fp8")))
    assert_same_tensors(load_hf_tensors(fp8), load_hf_tensors(str(tmp_path / "back")))

    _run("hf_to_mcore.sh", dict(env, HF_CKPT_PATH=bf16, MCORE_CKPT_PATH=str(tmp_path / "mc_bf16")))
    _run("mcore_bf16_to_hf_fp8.sh", dict(env, HF_CKPT_PATH=str(tmp_path / "hf_fp8"), MCORE_CKPT_PATH=str(tmp_path / "mc_bf16")))
    src, out, ref = load_hf_tensors(bf16), load_hf_tensors(str(tmp_path / "hf_fp8")), load_hf_tensors(fp8)
    assert sorted(out) == sorted(ref)
    for name, value in out.items():
        if value.dtype == torch.float8_e4m3fn:
            codes, scale = quantize_blocks(src[name])
            assert torch.equal(bits(value), bits(codes)) and torch.equal(out[name + "_scale_inv"], scale), name
    assert json.load(open(tmp_path / "hf_fp8" / "config.json"))["quantization_config"]["scale_fmt"] == "ue8m0"


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_scripts_round_trip(tiny_hf, tmp_path, example):
    spec, scaled = EXAMPLES[example]
    hf = tiny_hf(spec)
    if example == "kimi_k2":  # Kimi-K2 ships the DeepSeek-V3 layout under its own model_type
        hf = shutil.copytree(hf, tmp_path / "kimi_k2_hf")
        config = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps(dict(config, model_type="kimi_k2")))
        hf = str(hf)
    env = dict(os.environ, PYTHON=sys.executable, HF_CKPT_PATH=hf, MCORE_CKPT_PATH=str(tmp_path / "mcore"),
               MAX_WORKERS="2", **scaled)
    script = os.path.join(REPO, "examples", example)
    run = lambda name, env: subprocess.run(["bash", os.path.join(script, name), "--no_progress"], env=env,
                                           capture_output=True, text=True, timeout=300)
    proc = run("hf_to_mcore.sh", env)
    assert proc.returncode == 0, proc.stderr
    back = str(tmp_path / "back")
    proc = run("mcore_to_hf.sh", dict(env, HF_CKPT_PATH=back, HF_REFERENCE_PATH=hf))
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back))
    assert sorted(f for f in os.listdir(hf) if not f.endswith(".safetensors")) == sorted(
        f for f in os.listdir(back)
        if not f.endswith(".safetensors")
        and f not in ("model.safetensors.index.json", "conversion_report.json", "conversion_manifest.json"))


def test_foreign_megatron_checkpoint_with_config_file(tiny_hf, tmp_path):
    """A Megatron checkpoint without our args converts back given an architecture YAML."""
    spec = TinySpec("qwen2", tied=True)
    hf = tiny_hf(spec)
    mcore = str(tmp_path / "mcore")
    assert hf_to_mcore(hf, mcore, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    for rank, ckpt in rank_files(mcore).items():
        args = ckpt["args"]
        for name in [n for n in vars(args) if n.startswith("convert_checkpoint_")]:
            delattr(args, name)
        torch.save(ckpt, os.path.join(mcore, "release", rank, "model_optim_rng.pt"))
    back = str(tmp_path / "back")
    assert mcore_to_hf(mcore, back) == 2  # no way to know the architecture
    arch = tmp_path / "arch.yaml"
    arch.write_text("family: qwen2\nnum_layers: 4\nhidden_size: 64\nffn_hidden_size: 128\nnum_attention_heads: 8\n"
                    "num_query_groups: 4\nkv_channels: 8\nvocab_size: 250\ntied_embeddings: true\n")
    assert mcore_to_hf(mcore, back, config_file=str(arch)) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back))
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(back)  # the synthesized config.json is loadable
