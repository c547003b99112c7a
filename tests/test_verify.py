"""`convert-checkpoint verify A B`: checkpoints compared through the canonical form."""
from __future__ import annotations

import os
import shutil

import torch
from helpers import convert, hf_to_mcore
from safetensors.torch import load_file, save_file
from tiny_models import TinySpec, dequantize_checkpoint, make_fp8_checkpoint

from convert_checkpoint.verify import compare, format_report, load_canonical


def _verify(capsys, a: str, b: str, *extra: str) -> tuple[int, str]:
    rc = convert("verify", a, b, *extra)
    return rc, capsys.readouterr().out


def test_hf_and_mcore_of_any_layout_are_the_same_model(tiny_hf, tmp_path, capsys):
    hf = tiny_hf(TinySpec("qwen3_moe", mlp_only_layers=(0,)))
    tp2, pp2 = str(tmp_path / "tp2ep2"), str(tmp_path / "pp2")
    assert hf_to_mcore(hf, tp2, tensor_model_parallel_size=2, expert_parallel_size=2) == 0
    assert hf_to_mcore(hf, pp2, pipeline_model_parallel_size=2, transformer_impl="local", moe_grouped_gemm=True) == 0
    capsys.readouterr()
    for a, b in ((hf, tp2), (tp2, pp2)):
        rc, out = _verify(capsys, a, b)
        assert rc == 0 and out.strip().endswith("identical"), out
        assert "decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight" in out  # classes fold layer/expert numbers


def test_a_changed_tensor_is_found(tiny_hf, tmp_path, capsys):
    hf = tiny_hf(TinySpec("llama"))
    changed = str(shutil.copytree(hf, tmp_path / "changed"))
    file = os.path.join(changed, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.2.mlp.down_proj.weight"][3, 5] += 0.25
    save_file(tensors, file, metadata={"format": "pt"})
    mcore = str(tmp_path / "mcore")
    assert hf_to_mcore(hf, mcore, tensor_model_parallel_size=2) == 0
    capsys.readouterr()
    rc, out = _verify(capsys, mcore, changed)
    assert rc == 1 and out.strip().endswith("DIFFERENT")
    line = next(ln for ln in out.splitlines() if "mlp.linear_fc2.weight" in ln)
    assert line.split()[1:3] == ["4", "1"] and float(line.split()[3]) > 0.2  # 4 tensors, 1 differs
    rc, out = _verify(capsys, mcore, changed, "--atol", "0.5")
    assert rc == 0


def test_fp8_compares_dequantized_values(tiny_hf, tmp_path, capsys):
    bf16 = tiny_hf(TinySpec("deepseek_v3", mtp_layers=1, wide=True, dtype=torch.bfloat16))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"))
    plain = dequantize_checkpoint(fp8, str(tmp_path / "dequantized"))
    mcore = str(tmp_path / "mcore")
    assert hf_to_mcore(fp8, mcore, tensor_model_parallel_size=2, expert_parallel_size=2) == 0
    capsys.readouterr()
    rc, out = _verify(capsys, mcore, plain)  # FP8 rank files vs bf16 values: same model
    assert rc == 0 and "bfloat16 vs float8_e4m3fn" in out
    rc, out = _verify(capsys, fp8, bf16)  # the quantization error is a difference
    assert rc == 1


def test_missing_and_extra_tensors_are_listed(tiny_hf):
    hf = tiny_hf(TinySpec("llama"))
    a, b = load_canonical(hf), load_canonical(hf)
    del a.exprs["decoder.layers.1.mlp.linear_fc1.weight"]
    report = compare(a, b)
    assert not report.identical and report.only_b == ["decoder.layers.1.mlp.linear_fc1.weight"]
    assert "only in B: decoder.layers.1.mlp.linear_fc1.weight" in format_report(a, b, report)


def test_unusable_input_is_an_error(tiny_hf, tmp_path, capsys):
    hf = tiny_hf(TinySpec("llama"))
    other = tiny_hf(TinySpec("qwen3"))
    assert convert("verify", hf, str(tmp_path / "nowhere")) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert convert("verify", hf, other) == 2
    assert "llama model" in capsys.readouterr().err
