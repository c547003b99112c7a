"""Converted GLM-4.5 (glm4_moe) and MiniMax-M2 checkpoints against a real megatron-core GPTModel on CPU.

Grouped-query attention with q/k/v biases and partial RoPE (megatron's rotary_percent 0.5),
optional q/k norms, DeepSeek-V3's MoE block (dense first layer, sigmoid router with
score-correction bias and 2 expert groups, a shared expert) and an MTP layer on the last
pipeline stage. Every rank file loads with strict=True into the model megatron-core builds for
its rank; the main logits match transformers and the MTP logits the reference built from
transformers' layers, within 1e-4. One spawn of 8 workers runs every layout.

MiniMax-M2 (sigmoid router with score-correction bias, w1/w3/w2 experts on every layer, partial
RoPE) normalizes q and k over the whole projection, which megatron-core 0.16 has no module for:
the harness puts a stand-in full-width RMSNorm in the q_layernorm / k_layernorm slots (W10 in
mcore_harness.py; the weight whole on every TP rank, as the rank files hold it, squares summed
over TP). Everything else is megatron-core's own.
"""
from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from fixtures import MegatronCase, convert_case, expected_local_experts
from helpers import swap_paths
from mcore_harness import CheckJob, Layout, assert_all_ok, assert_only_negatives_fail, run_checks
from tiny_models import TinySpec

WORLD_SIZE = 8
NUM_EXPERTS = 4
SPECS = {"glm": TinySpec("glm4_moe", mtp_layers=1),  # first layer dense, no q/k norms (as published)
         "glm_qk": TinySpec("glm4_moe", qk_norm=True, first_dense=0),
         "minimax": TinySpec("minimax_m2")}
FIRST_DENSE = {"glm": range(1), "glm_qk": range(0), "minimax": range(0)}
MTP = {"glm": 1, "glm_qk": 0, "minimax": 0}

CASES = [
    # TP, uneven PP and EP at once; the MTP layer and its embedding copy on pp rank 1.
    MegatronCase("glm", Layout(2, 2, 1, (1, 3), ep=2), custom="1,3"),
    # TE names (fused qkv input norm, fused dense pre-MLP norm), whole experts over EP4, grouped GEMM.
    MegatronCase("glm", Layout(2, 1, 1, (4,), ep=4, etp=1), impl="transformer_engine", grouped=True),
    # use_qk_norm: per-head q/k norms; every layer MoE; PP2 with TE names.
    MegatronCase("glm_qk", Layout(2, 2, 1, (2, 2), ep=2), impl="transformer_engine"),
    # MiniMax-M2: full-width q/k norms split over TP 2, experts over EP 2 (ETP = TP), local names.
    MegatronCase("minimax", Layout(2, 1, 1, (4,), ep=2)),
    # MiniMax-M2: uneven PP, whole experts over EP 4, TE grouped-GEMM names.
    MegatronCase("minimax", Layout(1, 2, 1, (3, 1), ep=4, etp=1), impl="transformer_engine", grouped=True, custom="3,1"),
]


def test_strict_load_rank_files_and_logits(tiny_hf: Callable[[TinySpec], str], tmp_path: Path) -> None:
    hf_dirs = {name: tiny_hf(spec) for name, spec in SPECS.items()}
    jobs = [convert_case(case, hf_dirs[case.model], tmp_path / f"case{i}") for i, case in enumerate(CASES)]
    # Negative: two EP ranks' files of one (tp, pp) swapped; keys and shapes agree, logits must not.
    ep_swap = Path(shutil.copytree(jobs[0].mcore_dir, tmp_path / "neg_ep_swap"))
    swap_paths(ep_swap / "release" / "mp_rank_01_001_000", ep_swap / "release" / "mp_rank_01_001_001")
    # Negative: MiniMax's full-width q norm with its two halves (heads 0-3 and 4-7) exchanged in
    # layer 0 on both TP ranks: same keys and shapes, so only the logits can tell.
    norm_swap = Path(shutil.copytree(jobs[3].mcore_dir, tmp_path / "neg_q_norm_swap"))
    torch.serialization.add_safe_globals([argparse.Namespace])
    for rank_file in sorted(norm_swap.glob("release/*/model_optim_rng.pt")):
        ckpt = torch.load(rank_file, map_location="cpu", weights_only=True)
        weight = ckpt["model"]["decoder.layers.0.self_attention.q_layernorm.weight"]
        ckpt["model"]["decoder.layers.0.self_attention.q_layernorm.weight"] = torch.cat(weight.chunk(2)[::-1])
        torch.save(ckpt, rank_file)
    negatives = [CheckJob(jobs[0].hf_dir, str(ep_swap), jobs[0].layout, check_logits=True),
                 CheckJob(jobs[3].hf_dir, str(norm_swap), jobs[3].layout, check_logits=True)]

    all_jobs = jobs + negatives
    results = run_checks(WORLD_SIZE, all_jobs)

    assert_all_ok([r for r in results if r["job"] < len(jobs)], jobs, WORLD_SIZE)
    for index, case in enumerate(CASES):
        job_results = [r for r in results if r["job"] == index]
        assert len(job_results) == WORLD_SIZE and all(len(r["files"]) == 1 and r["ok"] for r in job_results), index
        layout = case.layout
        for res in job_results:
            assert res["local_experts"] == expected_local_experts(
                layout, res["pp_rank"], res["ep_rank"], NUM_EXPERTS, FIRST_DENSE[case.model]), (index, res)
            last_rank = res["pp_rank"] == layout.pp - 1
            assert res["mtp_layers_per_chunk"] == [
                MTP[case.model] if last_rank and c == layout.vpp - 1 else 0 for c in range(layout.vpp)], (index, res)
        diffs = [r["max_abs_diff"] for r in job_results if r["max_abs_diff"] is not None]
        assert len(diffs) == 1 and diffs[0] <= 1e-4, (index, diffs)
        mtp_diffs = [r["mtp_max_abs_diff"] for r in job_results if r["mtp_max_abs_diff"] is not None]
        assert len(mtp_diffs) == (1 if MTP[case.model] else 0) and all(d <= 1e-4 for d in mtp_diffs), (index, mtp_diffs)
        if case.impl == "transformer_engine" or case.grouped:
            assert all(r["renamed"] > 0 for r in job_results), index

    assert len(all_jobs) == len(jobs) + 2  # two negative controls
    assert_only_negatives_fail(results, all_jobs, WORLD_SIZE, len(jobs))
