"""Compatibility with the incumbent's on-disk layout, both entry points, and small units."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import hf_to_mcore, mcore_to_hf, rank_files
from tiny_models import TinySpec, make_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shared reference sits next to the checkout (also in CI); /work/shared covers clones elsewhere.
_LISTING = os.path.join("shared", "reference", "incumbent-layouts", "llama_tp2pp2.txt")
INCUMBENT = next((p for p in (os.path.join(REPO, "..", _LISTING), os.path.join("/work", _LISTING)) if os.path.exists(p)),
                 os.path.join(REPO, "..", _LISTING))


def _parse_incumbent_listing(path: str) -> dict[str, dict]:
    """rank dir -> {"tensors": {name: shape}, "entries": n} from the incumbent's key listing."""
    files: dict[str, dict] = {}
    current = None
    for line in open(path):
        m = re.match(r"== release/(mp_rank_\S+)/model_optim_rng.pt .* entries=(\d+) tensors=(\d+)", line)
        if m:
            current = files.setdefault(m.group(1), {"tensors": {}, "entries": int(m.group(2)), "count": int(m.group(3))})
            continue
        m = re.match(r"\s+model\.(\S+): \[([\d, ]+)\] bfloat16", line)
        if m and current is not None:
            current["tensors"][m.group(1)] = [int(x) for x in m.group(2).split(",")]
    return files


@pytest.mark.skipif(not os.path.exists(INCUMBENT), reason="shared reference listing not present")
def test_te_output_matches_incumbent_layout(tmp_path):
    """Same files, names, shapes and entry counts as the incumbent's TP=2 PP=2 Llama output."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=32, num_hidden_layers=4, vocab_size=1000, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    out = str(tmp_path / "mcore")
    assert hf_to_mcore(str(tmp_path / "hf"), out, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    ours = rank_files(out)
    theirs = _parse_incumbent_listing(INCUMBENT)
    assert sorted(ours) == sorted(theirs)
    for rank, listing in theirs.items():
        sd = ours[rank]["model"]
        assert len(sd) == listing["entries"]
        assert sum(v is not None for v in sd.values()) == listing["count"]
        for name, shape in listing["tensors"].items():  # layer 0 of each stage is listed
            assert list(sd[name].shape) == shape, name
            assert sd[name].dtype == torch.bfloat16
        assert ours[rank]["checkpoint_version"] == 3.0 and ours[rank]["iteration"] == 0
    assert open(os.path.join(out, "latest_checkpointed_iteration.txt")).read() == "release"


@pytest.mark.parametrize("entry", ["script", "console"])
def test_entry_points_dry_run(tiny_hf, tmp_path, entry):
    hf = tiny_hf(TinySpec("qwen3"))
    out = tmp_path / "out"
    flags = ["--load-platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", hf,
             "--save-ckpt-path", str(out), "--tensor_model_parallel_size", "2", "--dry_run", "--verbose"]
    if entry == "script":
        cmd = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint", "module_convertor", "model.py")] + flags
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "convert-checkpoint")] + flags
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "family=qwen3" in proc.stdout and "TP=2" in proc.stdout
    assert "model/decoder.layers.0.self_attention.q_layernorm.weight: [16] float32" in proc.stdout
    assert not out.exists()


def test_flag_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "convert_checkpoint", "--load_platform", "huggingface"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "required" in proc.stderr


def test_explicit_yamls_override_and_record_family(tiny_hf, tmp_path):
    """--config_file/--convert_file override detection; MCore->HF then needs no flags."""
    hf = tiny_hf(TinySpec("llama"))
    arch_yaml = tmp_path / "arch.yaml"
    arch_yaml.write_text("norm_epsilon: 1.0e-5\n")
    convert_yaml = os.path.join(REPO, "configs", "models", "llama", "ckpt_convert", "llama_convert.yaml")
    out = str(tmp_path / "m")
    assert hf_to_mcore(hf, out, config_file=str(arch_yaml), convert_file=convert_yaml) == 0
    args = rank_files(out)["mp_rank_00"]["args"]
    assert args.norm_epsilon == 1e-5 and args.convert_checkpoint_family == "llama"
    assert args.convert_checkpoint_arch["num_layers"] == 4
    back = str(tmp_path / "back")
    assert mcore_to_hf(out, back) == 0
    assert json.load(open(os.path.join(back, "config.json")))["rms_norm_eps"] == 1e-5  # the override is kept


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_arch_from_config_matches_transformers(tmp_path, family):
    """Our YAML defaults agree with transformers' config classes for the fields we derive."""
    from transformers import AutoConfig

    from convert_checkpoint.config.arch import arch_from_hf_config
    from convert_checkpoint.config.family import family_by_name

    path = make_tiny_model(TinySpec(family), str(tmp_path / family))
    raw = json.load(open(os.path.join(path, "config.json")))
    fam = family_by_name(family)
    arch = arch_from_hf_config(raw, family, fam.config_fields, fam.config_defaults, fam.fixed_arch)
    cfg = AutoConfig.from_pretrained(path)
    assert arch.num_layers == cfg.num_hidden_layers and arch.hidden_size == cfg.hidden_size
    assert arch.num_query_groups == cfg.num_key_value_heads
    assert arch.kv_channels == getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert arch.tied_embeddings == cfg.tie_word_embeddings
    assert arch.norm_epsilon == cfg.rms_norm_eps
    assert arch.add_qkv_bias == (family == "qwen2" or getattr(cfg, "attention_bias", False))
