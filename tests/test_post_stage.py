"""Converters after the model mapping: ``--converter`` on MCore -> HF runs the chain on the HF
tensors before they are written, in one pass, with the same bytes as MCore -> HF followed by
``convert-checkpoint hf`` with the same chain."""
from __future__ import annotations

import json
import os

from fixtures import assert_fails, load_hf_tensors, read_tree
from helpers import assert_same_tensors, convert, hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "converters")
CAST = "cast_dtype:make:dtype=bfloat16"


def test_mcore_to_hf_through_converters_equals_two_steps(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    hf = tiny_hf(TinySpec("qwen3_moe"))  # fp32: the converter casts every tensor to bf16
    mcore, one, plain, two = (str(tmp_path / n) for n in ("m", "one", "plain", "two"))
    assert hf_to_mcore(hf, mcore, tensor_model_parallel_size=2, expert_parallel_size=2) == 0
    assert mcore_to_hf(mcore, one, converter=CAST, max_shard_size="200KB") == 0
    assert mcore_to_hf(mcore, plain, max_shard_size="200KB") == 0
    assert convert("hf", plain, two, "--converter", CAST) == 0
    out = load_hf_tensors(one)
    assert {t.dtype for t in out.values()} == {__import__("torch").bfloat16}
    assert_same_tensors(load_hf_tensors(two), out)
    # The same shards and index (the converted tensors are sharded by size like any others), and
    # config.json as the chain leaves it.
    skip = {"conversion_report.json", "conversion_manifest.json"}
    assert read_tree(one, skip) == read_tree(two, skip)
    assert json.load(open(os.path.join(one, "config.json")))["torch_dtype"] == "bfloat16"


def test_converters_between_two_megatron_checkpoints_are_refused(tiny_hf, tmp_path, capsys):
    mcore, out = str(tmp_path / "m"), str(tmp_path / "out")
    assert hf_to_mcore(tiny_hf(TinySpec("llama")), mcore) == 0
    capsys.readouterr()
    assert_fails(capsys, convert("--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", mcore,
                                 "--save_ckpt_path", out, "--converter", "dequantize"), out,
                 "--converter runs on HuggingFace tensors")


def test_fp8_megatron_to_hf_through_converters(tiny_hf, tmp_path, monkeypatch):
    """Block-FP8 parameters reach the chain as their bf16 values (as `dequantize` would give
    them) and config.json loses the FP8 quantization_config: the two-step route's bytes."""
    import torch

    from tiny_models import make_fp8_checkpoint

    monkeypatch.syspath_prepend(EXAMPLES)
    bf16 = tiny_hf(TinySpec("deepseek_v3", mtp_layers=1, wide=True, dtype=torch.bfloat16))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"))
    mcore, one, plain, two = (str(tmp_path / n) for n in ("m", "one", "plain", "two"))
    assert hf_to_mcore(fp8, mcore, tensor_model_parallel_size=2) == 0
    assert mcore_to_hf(mcore, one, converter=CAST) == 0
    assert mcore_to_hf(mcore, plain) == 0
    assert convert("hf", plain, two, "--converter", "dequantize:dtype=bfloat16", "--converter", CAST) == 0
    out = load_hf_tensors(one)
    assert not any(n.endswith("_scale_inv") for n in out) and {t.dtype for t in out.values()} == {torch.bfloat16}
    assert_same_tensors(load_hf_tensors(two), out)
    config = json.load(open(os.path.join(one, "config.json")))
    assert "quantization_config" not in config
    assert config == json.load(open(os.path.join(two, "config.json")))


def test_mcore_to_quantized_hf_equals_two_steps(tiny_hf, tmp_path, capsys):
    """--quantize on MCore -> HF (item 8 of issue 15): one pass, the bytes of MCore -> HF then
    `convert-checkpoint quantize` with the same scheme and options, config.json included."""
    hf = tiny_hf(TinySpec("qwen3_moe"))
    mcore, one, plain, two = (str(tmp_path / n) for n in ("m", "one", "plain", "two"))
    assert hf_to_mcore(hf, mcore, tensor_model_parallel_size=2, expert_parallel_size=2) == 0
    for scheme, extra in (("NVFP4A16", ["--ignore", "re:.*down_proj$"]), ("FP8_DYNAMIC", ["--rounding", "weight_dtype"])):
        for d in (one, plain, two):
            if os.path.isdir(d):
                import shutil

                shutil.rmtree(d)
        assert convert("--load_platform", "mcore", "--save_platform", "huggingface", "--load_ckpt_path", mcore,
                       "--save_ckpt_path", one, "--max_shard_size", "150KB", "--quantize", scheme, *extra) == 0
        assert mcore_to_hf(mcore, plain, max_shard_size="150KB") == 0
        assert convert("quantize", plain, two, "--scheme", scheme, *extra) == 0
        skip = {"conversion_report.json", "conversion_manifest.json"}
        assert read_tree(one, skip) == read_tree(two, skip), scheme
        assert json.load(open(os.path.join(one, "config.json")))["quantization_config"]["quant_method"] == \
            "compressed-tensors"
    capsys.readouterr()
    assert convert("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", hf,
                   "--save_ckpt_path", str(tmp_path / "x"), "--quantize", "NVFP4A16") == 2
    assert "needs --save_platform huggingface" in capsys.readouterr().err
    assert convert("--load_platform", "mcore", "--save_platform", "huggingface", "--load_ckpt_path", mcore,
                   "--save_ckpt_path", str(tmp_path / "y"), "--ignore", "lm_head") == 2
    assert "--ignore goes with --quantize" in capsys.readouterr().err
