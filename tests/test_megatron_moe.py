"""Converted MoE checkpoints (Qwen3-MoE, Mixtral) against a real megatron-core GPTModel on CPU.

Every rank file must load with strict=True into the model megatron-core builds for that rank,
with routed experts split over expert parallelism (EP) and expert tensor parallelism (ETP).
The rank -> file mapping comes from megatron's ``parallel_state`` (tp, pp, ep ranks). TE names
and grouped-GEMM expert names are mapped back to local-spec names first. The logits must match
transformers. Spawning costs about 3 s per process on this box, so every layout runs in ONE
spawn of 8 workers.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import hf_to_mcore
from mcore_harness import CheckJob, Layout, assert_all_ok, job_problems, run_checks
from tiny_models import TinySpec

WORLD_SIZE = 8
NUM_EXPERTS = 4  # tiny_models: 4 experts on every layer, top-2
QWEN3_MOE, MIXTRAL = TinySpec("qwen3_moe"), TinySpec("mixtral")


@dataclass(frozen=True)
class Case:
    model: str  # "qwen3_moe", "qwen3_moe_norm_topk" or "mixtral"
    layout: Layout
    impl: str = "local"  # --transformer_impl
    grouped: bool = False  # --moe-grouped-gemm
    custom: str | None = None  # --custom_pipeline_layers


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
]


def _norm_topk_copy(hf_dir: str, out: Path) -> str:
    """The tiny Qwen3-MoE with norm_topk_prob=True (same weights, renormalized routing)."""
    shutil.copytree(hf_dir, out)
    config_path = out / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text())
    config["norm_topk_prob"] = True
    config_path.write_text(json.dumps(config))
    return str(out)


def _convert(case: Case, hf_dir: str, out: Path) -> CheckJob:
    layout = case.layout
    rc = hf_to_mcore(
        hf_dir,
        str(out),
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_parallel_size=layout.ep,
        # Omitted when ETP = TP, so the converter's default is what gets tested.
        expert_tensor_parallel_size=layout.etp if layout.etp != layout.tp else None,
        custom_pipeline_layers=case.custom,
        transformer_impl=case.impl,
        **{"moe-grouped-gemm": case.grouped},
    )
    assert rc == 0, case
    return CheckJob(hf_dir, str(out), layout, te_names=case.impl == "transformer_engine",
                    check_logits=True, grouped_gemm=case.grouped)


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _job_results(results: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    return [r for r in results if r["job"] == index]


def test_moe_strict_load_rank_files_and_logits(tiny_hf: Callable[[TinySpec], str], tmp_path: Path) -> None:
    hf_dirs = {
        "qwen3_moe": tiny_hf(QWEN3_MOE),
        "mixtral": tiny_hf(MIXTRAL),
        "qwen3_moe_norm_topk": _norm_topk_copy(tiny_hf(QWEN3_MOE), tmp_path / "hf_qwen3_moe_norm_topk"),
    }
    jobs = [_convert(case, hf_dirs[case.model], tmp_path / f"case{i}") for i, case in enumerate(CASES)]

    # Negative control: two EP ranks' files of one (tp, pp) swapped. Keys and shapes agree
    # (local expert indices), so every strict load passes and only the logits can tell.
    swapped = Path(shutil.copytree(jobs[0].mcore_dir, tmp_path / "neg_ep_swap"))
    _swap(swapped / "release" / "mp_rank_01_001_000", swapped / "release" / "mp_rank_01_001_001")
    negative = CheckJob(jobs[0].hf_dir, str(swapped), jobs[0].layout, check_logits=True)

    all_jobs = jobs + [negative]
    results = run_checks(WORLD_SIZE, all_jobs)

    assert_all_ok([r for r in results if r["job"] < len(jobs)], jobs, WORLD_SIZE)
    for index, (case, job) in enumerate(zip(CASES, jobs)):
        job_results = _job_results(results, index)
        # No check may be skipped: every rank opened one file, built and loaded MoE layers
        # holding its EP share of the experts, and exactly one rank compared logits.
        assert len(job_results) == WORLD_SIZE and all(len(r["files"]) == 1 for r in job_results), index
        per_rank = NUM_EXPERTS // case.layout.ep
        for res in job_results:
            assert res["local_experts"] == [list(range(res["ep_rank"] * per_rank, (res["ep_rank"] + 1) * per_rank))]
        diffs = [r["max_abs_diff"] for r in job_results if r["max_abs_diff"] is not None]
        assert len(diffs) == 1 and diffs[0] <= 1e-4, (index, diffs)
        if case.grouped or case.impl == "transformer_engine":
            assert all(r["renamed"] > 0 for r in job_results), (index, [r["renamed"] for r in job_results])

    # Which (tp, ep) pairs exist follows megatron's rank order (ETP1: ep rank = rank % ep).
    assert sorted({f for r in _job_results(results, 1) for f in r["files"]}) == [
        "mp_rank_00_000", "mp_rank_00_002", "mp_rank_01_001", "mp_rank_01_003"]
    assert sorted({f for r in _job_results(results, 2) for f in r["files"]}) == ["mp_rank_00_000", "mp_rank_01_001"]

    problems = job_problems(results, all_jobs, WORLD_SIZE)
    assert sorted(problems) == [len(jobs)], problems
    assert "logits max|diff|" in "\n".join(problems[len(jobs)])
    assert all(r["ok"] for r in _job_results(results, len(jobs)))
