"""Converted GPT-OSS (gpt_oss) checkpoints against a real megatron-core GPTModel on CPU.

megatron-core 0.16.1 represents every part of GPT-OSS with its own modules: q/k/v biases
(add_qkv_bias) and the o_proj, router and expert biases (add_bias_linear), the attention sinks
(softmax_type "learnable": core_attention.softmax_offset, split over TP by heads), sliding-window
attention on every other layer (window_size (sliding_window - 1, 0) with a window_attn_skip_freq
list from layer_types) and the clamped SwiGLU (quick_gelu GLU, glu_linear_offset 1,
activation_func_clamp_value 7). Every rank file loads with strict=True into the model
megatron-core builds for its rank and the logits match transformers within 1e-4 (the tiny model's
4-token window is shorter than the 12-token input, so the window is exercised). The harness only
builds the sliding-window mask on the CPU (W11 in mcore_harness.py). One spawn of 4 workers runs
every layout. megatron-core builds expert biases only at ETP 1 ("Bias in Moe is only supported when
ETP==1"), so every layout has ETP 1 and the converter refuses ETP > 1 for this family. Two
negatives (sinks reversed within each rank; gate and up exchanged in one expert) load strictly and
must fail on the logits. (Checked by hand, not by this test: with megatron's window one token
wider, (sliding_window, 0), the logits differ by 0.13, so the window matters at this length.)
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from fixtures import MegatronCase, convert_case, expected_local_experts, load_hf_tensors
from helpers import hf_to_mcore, mcore_to_hf
from mcore_harness import CheckJob, Layout, assert_all_ok, assert_only_negatives_fail, run_checks
from tiny_models import TinySpec

WORLD_SIZE = 4
NUM_EXPERTS = 4
GPT_OSS = TinySpec("gpt_oss", dtype=torch.bfloat16)

CASES = [
    # TP 2, uneven PP (3, 1), whole experts over EP 2, local names.
    MegatronCase("gpt_oss", Layout(2, 2, 1, (3, 1), ep=2, etp=1), custom="3,1"),
    # TE names (input norm fused into linear_qkv), grouped-GEMM experts over EP 2 within TP 2.
    MegatronCase("gpt_oss", Layout(2, 1, 1, (4,), ep=2, etp=1), impl="transformer_engine", grouped=True),
    # PP (1, 3) with TE names, EP 2.
    MegatronCase("gpt_oss", Layout(1, 2, 1, (1, 3), ep=2), impl="transformer_engine", custom="1,3"),
    # No parallelism at all (4 data-parallel replicas).
    MegatronCase("gpt_oss", Layout(1, 1, 1, (4,))),
]


def _edit_rank_files(src: str, dst: Path, edit: Callable[[dict], None]) -> str:
    out = Path(shutil.copytree(src, dst))
    torch.serialization.add_safe_globals([argparse.Namespace])
    for rank_file in sorted(out.glob("release/*/model_optim_rng.pt")):
        ckpt = torch.load(rank_file, map_location="cpu", weights_only=True)
        edit(ckpt["model"])
        torch.save(ckpt, rank_file)
    return str(out)


def _reverse_sinks(model: dict) -> None:
    key = "decoder.layers.0.self_attention.core_attention.softmax_offset"
    model[key] = model[key].flip(0).contiguous()


def _swap_gate_up(model: dict) -> None:
    for key in [k for k in model if k.endswith("mlp.experts.linear_fc1.weight0")]:
        gate, up = model[key].chunk(2)
        model[key] = torch.cat([up, gate])


def test_strict_load_rank_files_and_logits(tiny_hf: Callable[[TinySpec], str], tmp_path: Path) -> None:
    hf_dir = tiny_hf(GPT_OSS)
    jobs = [convert_case(case, hf_dir, tmp_path / f"case{i}") for i, case in enumerate(CASES)]
    negatives = [
        CheckJob(hf_dir, _edit_rank_files(jobs[0].mcore_dir, tmp_path / "neg_sinks", _reverse_sinks), jobs[0].layout,
                 check_logits=True),
        CheckJob(hf_dir, _edit_rank_files(jobs[1].mcore_dir, tmp_path / "neg_gate_up", _swap_gate_up), jobs[1].layout,
                 te_names=True, check_logits=True, grouped_gemm=True),
    ]
    # torch_dist both ways: megatron-core's own dist_checkpointing.load (strict) of what we write,
    # and what megatron-core saves (job 0's loaded model) converted back to HF.
    dist_dir = str(tmp_path / "dist")
    assert hf_to_mcore(hf_dir, dist_dir, ckpt_format="torch_dist", transformer_impl="local") == 0
    jobs.append(CheckJob(hf_dir, dist_dir, Layout(2, 2, 1, (2, 2), ep=2, etp=1), check_logits=True,
                         ckpt_format="torch_dist", padded_vocab=256))
    saved = str(tmp_path / "megatron_saved")
    jobs[0] = dataclasses.replace(jobs[0], save_torch_dist=saved)
    all_jobs = jobs + negatives
    results = run_checks(WORLD_SIZE, all_jobs)

    assert_all_ok([r for r in results if r["job"] < len(jobs)], jobs, WORLD_SIZE)
    dist_diffs = [r["max_abs_diff"] for r in results if r["job"] == len(CASES) and r["max_abs_diff"] is not None]
    assert len(dist_diffs) == 1 and dist_diffs[0] <= 1e-4, dist_diffs
    back = str(tmp_path / "back")
    assert mcore_to_hf(saved, back, hf_config_path=hf_dir) == 0  # megatron's save holds no args
    source, megatron = load_hf_tensors(hf_dir), load_hf_tensors(back)
    assert sorted(source) == sorted(megatron)
    for name, value in source.items():  # the model ran in fp32: the bf16 values came back exactly
        assert torch.equal(megatron[name].to(value.dtype), value), name
    for index, case in enumerate(CASES):
        job_results = [r for r in results if r["job"] == index]
        assert len(job_results) == WORLD_SIZE and all(len(r["files"]) == 1 and r["ok"] for r in job_results), index
        for res in job_results:
            assert res["local_experts"] == expected_local_experts(
                case.layout, res["pp_rank"], res["ep_rank"], NUM_EXPERTS), (index, res)
        diffs = [r["max_abs_diff"] for r in job_results if r["max_abs_diff"] is not None]
        assert len(diffs) == 1 and diffs[0] <= 1e-4, (index, diffs)
        if case.impl == "transformer_engine" or case.grouped:
            assert all(r["renamed"] > 0 for r in job_results), index

    assert len(all_jobs) == len(jobs) + 2  # two negative controls
    assert_only_negatives_fail(results, all_jobs, WORLD_SIZE, len(jobs))
