"""Converted MoE checkpoints (Qwen3-MoE, Mixtral, Qwen2-MoE) against a real megatron-core
GPTModel on CPU.

Every rank file must load with strict=True into the model megatron-core builds for that rank,
with routed experts split over expert parallelism (EP) and expert tensor parallelism (ETP),
dense layers where the HF config has them (mlp_only_layers -> moe_layer_freq) and Qwen2-MoE's
shared expert with its sigmoid gate (moe_shared_expert_gate).
The rank -> file mapping comes from megatron's ``parallel_state`` (tp, pp, ep ranks). TE names
and grouped-GEMM expert names are mapped back to local-spec names first. The logits must match
transformers. Spawning costs about 3 s per process on this box, so every layout runs in ONE
spawn of 8 workers.
"""
from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fixtures import MegatronCase as Case
from fixtures import convert_case, expected_local_experts
from helpers import swap_paths
from mcore_harness import CheckJob, Layout, assert_all_ok, job_problems, run_checks
from tiny_models import TinySpec

WORLD_SIZE = 8
NUM_EXPERTS = 4  # tiny_models: 4 experts (top-2) on every layer not listed in mlp_only_layers
QWEN3_MOE, MIXTRAL = TinySpec("qwen3_moe"), TinySpec("mixtral")
# Qwen2-MoE: qkv biases, shared expert (64) with a sigmoid gate, layer 1 dense.
QWEN2_MOE = TinySpec("qwen2_moe", mlp_only_layers=(1,))
QWEN3_MOE_DENSE = TinySpec("qwen3_moe", mlp_only_layers=(0, 2))
DENSE_LAYERS = {"qwen2_moe": QWEN2_MOE.mlp_only_layers, "qwen3_moe_dense": QWEN3_MOE_DENSE.mlp_only_layers}


# Case.model: "qwen3_moe", "qwen3_moe_norm_topk", "mixtral", "qwen2_moe" or "qwen3_moe_dense".
CASES = [
    # ETP defaults to TP; logits through TP, PP and EP at once.
    Case("qwen3_moe", Layout(2, 2, 1, (2, 2), ep=2)),
    # Whole experts (ETP1) over 4 EP ranks; Mixtral renormalizes the top-k.
    Case("mixtral", Layout(2, 1, 1, (4,), ep=4, etp=1)),
    # Grouped-GEMM expert names, read back through the local SequentialMLP.
    Case("qwen3_moe", Layout(2, 1, 1, (4,), ep=2, etp=1), grouped=True),
    # Uneven custom pipeline, TE names (MoE layers keep pre_mlp_layernorm under TE).
    Case("mixtral", Layout(1, 2, 1, (3, 1), ep=2), impl="transformer_engine", custom="3,1"),
    # Qwen3-MoE with norm_topk_prob=True: grouped + TE names, ETP1 under PP2.
    Case("qwen3_moe_norm_topk", Layout(2, 2, 1, (2, 2), ep=2, etp=1), impl="transformer_engine", grouped=True),
    # Qwen2-MoE through TP, PP and EP (ETP = TP): the shared expert is TP-split like a dense
    # MLP, its gate replicated; pp rank 0 holds the dense layer 1.
    Case("qwen2_moe", Layout(2, 2, 1, (2, 2), ep=2)),
    # Qwen2-MoE, TE names (dense layer: fused pre-MLP norm; MoE layers: pre_mlp_layernorm),
    # whole experts (ETP1) over 2 EP ranks.
    Case("qwen2_moe", Layout(2, 1, 1, (4,), ep=2, etp=1), impl="transformer_engine"),
    # Qwen3-MoE with dense layers 0 and 2, uneven pipeline: pp rank 0 holds only the dense
    # layer 0 (no experts, still one file per (tp, ep) pair), pp rank 1 MoE, dense, MoE.
    Case("qwen3_moe_dense", Layout(2, 2, 1, (1, 3), ep=2), custom="1,3"),
]


def _norm_topk_copy(hf_dir: str, out: Path) -> str:
    """The tiny Qwen3-MoE with norm_topk_prob=True (same weights, renormalized routing)."""
    shutil.copytree(hf_dir, out)
    config_path = out / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text())
    config["norm_topk_prob"] = True
    config_path.write_text(json.dumps(config))
    return str(out)


def _negate_shared_expert_gates(mcore_dir: Path) -> None:
    """Flip the sign of every Qwen2-MoE shared-expert gate (sigmoid(z) -> sigmoid(-z))."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    files = sorted(mcore_dir.glob("release/*/model_optim_rng.pt"))
    for path in files:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        gates = [key for key in ckpt["model"] if key.endswith("mlp.shared_experts.gate_weight")]
        assert gates, path
        for key in gates:
            ckpt["model"][key] = -ckpt["model"][key]
        torch.save(ckpt, path)


def _job_results(results: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    return [r for r in results if r["job"] == index]


def test_moe_strict_load_rank_files_and_logits(tiny_hf: Callable[[TinySpec], str], tmp_path: Path) -> None:
    hf_dirs = {
        "qwen3_moe": tiny_hf(QWEN3_MOE),
        "mixtral": tiny_hf(MIXTRAL),
        "qwen3_moe_norm_topk": _norm_topk_copy(tiny_hf(QWEN3_MOE), tmp_path / "hf_qwen3_moe_norm_topk"),
        "qwen2_moe": tiny_hf(QWEN2_MOE),
        "qwen3_moe_dense": tiny_hf(QWEN3_MOE_DENSE),
    }
    jobs = [convert_case(case, hf_dirs[case.model], tmp_path / f"case{i}") for i, case in enumerate(CASES)]

    # Negative control: two EP ranks' files of one (tp, pp) swapped. Keys and shapes agree
    # (local expert indices), so every strict load passes and only the logits can tell.
    swapped = Path(shutil.copytree(jobs[0].mcore_dir, tmp_path / "neg_ep_swap"))
    swap_paths(swapped / "release" / "mp_rank_01_001_000", swapped / "release" / "mp_rank_01_001_001")
    negative = CheckJob(jobs[0].hf_dir, str(swapped), jobs[0].layout, check_logits=True)
    # Negative control: Qwen2-MoE shared-expert gates negated. Strict loads pass; the logits
    # must show that megatron applies the gate (sigmoid(x @ gate_weight.T) * shared(x)).
    qwen2 = CASES.index(Case("qwen2_moe", Layout(2, 2, 1, (2, 2), ep=2)))
    gated = Path(shutil.copytree(jobs[qwen2].mcore_dir, tmp_path / "neg_shared_gate"))
    _negate_shared_expert_gates(gated)
    negative_gate = CheckJob(jobs[qwen2].hf_dir, str(gated), jobs[qwen2].layout, check_logits=True)

    negatives = [negative, negative_gate]
    all_jobs = jobs + negatives
    results = run_checks(WORLD_SIZE, all_jobs)

    assert_all_ok([r for r in results if r["job"] < len(jobs)], jobs, WORLD_SIZE)
    for index, (case, job) in enumerate(zip(CASES, jobs)):
        job_results = _job_results(results, index)
        # No check may be skipped: every rank opened one file, built and loaded MoE layers
        # holding its EP share of the experts (none on a stage of dense layers only), and
        # exactly one rank compared logits.
        assert len(job_results) == WORLD_SIZE and all(len(r["files"]) == 1 for r in job_results), index
        for res in job_results:
            assert res["local_experts"] == expected_local_experts(
                case.layout, res["pp_rank"], res["ep_rank"], NUM_EXPERTS, DENSE_LAYERS.get(case.model, ())), (
                index, res["rank"], res["local_experts"])
        diffs = [r["max_abs_diff"] for r in job_results if r["max_abs_diff"] is not None]
        assert len(diffs) == 1 and diffs[0] <= 1e-4, (index, diffs)
        if case.grouped or case.impl == "transformer_engine":
            assert all(r["renamed"] > 0 for r in job_results), (index, [r["renamed"] for r in job_results])

    # Which (tp, ep) pairs exist follows megatron's rank order (ETP1: ep rank = rank % ep).
    assert sorted({f for r in _job_results(results, 1) for f in r["files"]}) == [
        "mp_rank_00_000", "mp_rank_00_002", "mp_rank_01_001", "mp_rank_01_003"]
    assert sorted({f for r in _job_results(results, 2) for f in r["files"]}) == ["mp_rank_00_000", "mp_rank_01_001"]
    assert sorted({f for r in _job_results(results, 6) for f in r["files"]}) == [
        "mp_rank_00_000", "mp_rank_01_001"]
    # The stage of dense layers only still has one file per (tp, ep) pair.
    assert len({f for r in _job_results(results, 7) for f in r["files"]}) == 8
    assert [r["layers_per_chunk"] for r in _job_results(results, 7)] == [[1]] * 4 + [[3]] * 4

    problems = job_problems(results, all_jobs, WORLD_SIZE)
    negative_indices = list(range(len(jobs), len(all_jobs)))
    assert sorted(problems) == negative_indices, problems
    for index in negative_indices:
        assert "logits max|diff|" in "\n".join(problems[index]), problems[index]
        assert all(r["ok"] for r in _job_results(results, index))
