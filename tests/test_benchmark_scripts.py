"""The benchmark scripts keep working (on tiny inputs; no timings are asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_full_size_on_a_small_deepseek_config(tmp_path):
    config = json.load(open(os.path.join(REPO, "benchmarks", "configs", "deepseek_v3_config.json")))
    small = dict(config, hidden_size=256, num_hidden_layers=4, n_routed_experts=8, intermediate_size=512,
                 moe_intermediate_size=128, num_attention_heads=8, num_key_value_heads=8, vocab_size=1000,
                 first_k_dense_replace=1)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(small))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "plan_full_size.py"), str(path),
                           str(tmp_path / "work"), "--", "--tensor_model_parallel_size", "2",
                           "--pipeline_model_parallel_size", "2", "--expert_parallel_size", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "plan + validation (--dry_run)" in proc.stderr
    assert "target:" in proc.stdout and "(16 files" in proc.stdout  # TP2 x EP4 files on each of 2 stages
    assert not os.path.exists(tmp_path / "work" / "mcore")  # a dry run writes nothing
    # DeepSeek's FP8 layout: weights with their block scales, kept (128-multiple sizes at TP2).
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "plan_full_size.py"), "--fp8", str(path),
                           str(tmp_path / "work_fp8"), "--", "--tensor_model_parallel_size", "2",
                           "--expert_parallel_size", "4", "--expert_tensor_parallel_size", "1",
                           "--force_pow_2_scales", "false"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # The shared expert (128 rows) split by TP=2 cuts its blocks: requantized, and said so.
    assert "172 keep their codes and scales unless their scale style differs, 32 are requantized" in proc.stdout
    assert ("requantize decoder.layers.1.mlp.shared_experts.linear_fc1.weight: "
            "model.layers.1.mlp.shared_experts.gate_proj.weight: the cut at row 64 of 128") in proc.stdout


def test_fp8_gpu_check_runs_without_a_gpu(tmp_path):
    """The GPU check script stays runnable: on CPU it runs what it can and marks the TE/GPU
    parts SKIP, loudly, instead of passing them."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "fp8_gpu_check.py"), "--quick",
                           "--no-compile", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "\nFAIL" not in proc.stdout and "SKIP 1.pt==te" in proc.stdout and "\nPASS " in proc.stdout
    assert json.loads(out.read_text())
