"""Every example script runs, with its own flags, on a tiny model of its family."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import assert_same_tensors, hf_to_mcore, load_hf_tensors, mcore_to_hf, rank_files
from tiny_models import TinySpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = {"llama3_8b": "llama", "qwen2_5_7b": "qwen2", "qwen3_8b": "qwen3",
            "qwen3_30b_a3b": "qwen3_moe", "mixtral_8x7b": "mixtral"}


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_scripts_round_trip(tiny_hf, tmp_path, example):
    hf = tiny_hf(TinySpec(EXAMPLES[example]))
    env = dict(os.environ, PYTHON=sys.executable, HF_CKPT_PATH=hf, MCORE_CKPT_PATH=str(tmp_path / "mcore"), MAX_WORKERS="2")
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
        f for f in os.listdir(back) if not f.endswith(".safetensors") and f != "model.safetensors.index.json")


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
