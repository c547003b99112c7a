"""Converted DeepSeek-V3 / V2 checkpoints against a real megatron-core GPTModel on CPU.

Multi-latent attention, dense first layer, routed experts over EP / ETP, shared experts, the
V3 router (sigmoid, score-correction bias, expert groups, scaling) and MTP layers on the last
pipeline stage. Every rank file must load with strict=True into the model megatron-core builds
for its rank (TE names, TE-replicated MLA down projections and grouped-GEMM expert names are
first mapped to the local spec), the main logits must match transformers and the MTP logits a
reference built from transformers' layers and the HF MTP weights. Spawning costs about 3 s per
process here, so every layout runs in ONE spawn of 8 workers.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from convert_checkpoint.quant.te_pickle import Fp8BlockRecord
from fixtures import MegatronCase, convert_case, expected_local_experts
from helpers import rank_files, swap_paths
from mcore_harness import CheckJob, Layout, assert_all_ok, assert_only_negatives_fail, run_checks
from tiny_models import TinySpec, dequantize_checkpoint, make_fp8_checkpoint

WORLD_SIZE = 8
NUM_EXPERTS, FIRST_DENSE = 4, 1  # tiny_models: 4 routed experts, layer 0 dense
SPECS = {"v3": TinySpec("deepseek_v3", mtp_layers=1), "v2": TinySpec("deepseek_v2"),
         # 128-multiple sizes, bf16: the source of the FP8 checkpoint
         "v3wide": TinySpec("deepseek_v3", mtp_layers=1, wide=True, dtype=torch.bfloat16)}


@dataclass(frozen=True)
class Case(MegatronCase):
    # model: "v3" (q-LoRA, sigmoid router with bias and groups, MTP) or "v2" (q_proj, softmax greedy)
    fp8: bool = False  # convert DeepSeek's FP8 layout of the model (TE FP8 parameters in the rank files)

    @property
    def mtp(self) -> int:
        return SPECS[self.model].mtp_layers


CASES = [
    # TP, PP and EP at once (ETP = TP); the MTP layer and its embedding copy on pp rank 1.
    Case("v3", Layout(2, 2, 1, (2, 2), ep=2)),
    # TE names: fused q/kv norms, fused pre-MLP norm of the dense layer, down projections
    # replicated over TP; whole experts (ETP1) over 4 EP ranks with grouped-GEMM names
    # (the MTP layer's experts too), as in examples/deepseek_v3.
    Case("v3", Layout(2, 1, 1, (4,), ep=4, etp=1), impl="transformer_engine", grouped=True),
    # V2-Lite style: no q-LoRA (linear_q_proj), softmax greedy routing, 2 shared experts.
    Case("v2", Layout(2, 1, 1, (4,), ep=2)),
    # Interleaved pipeline: the MTP layer goes to the last virtual stage (pp rank 1, model1);
    # pp rank 0's first chunk holds only the dense layer.
    Case("v3", Layout(1, 2, 2, (1, 1, 1, 1), ep=2), impl="transformer_engine"),
    # FP8: DeepSeek's published layout (weight + weight_scale_inv) -> TE FP8 parameters, every
    # block kept; megatron gets their dequantized values (as TE's dequantize() gives them), and
    # the reference is the HF model of the same dequantized weights.
    Case("v3wide", Layout(2, 1, 1, (4,), ep=2), impl="transformer_engine", fp8=True),
]


def _convert(case: Case, hf_dir: str, out: Path) -> CheckJob:
    """``convert_case``; an FP8 case converts DeepSeek's FP8 layout of the model and is checked
    against the HF model of its dequantized weights."""
    if not case.fp8:
        return convert_case(case, hf_dir, out)
    fp8_dir = make_fp8_checkpoint(hf_dir, str(out.with_name(out.name + "_hf_fp8")))
    hf_dir = dequantize_checkpoint(fp8_dir, str(out.with_name(out.name + "_hf_dequantized")))
    job = convert_case(case, hf_dir, out, source_dir=fp8_dir)
    fp8_params = [n for sd in rank_files(str(out)).values() for n, v in sd["model"].items()
                  if isinstance(v, Fp8BlockRecord)]
    # 4 rank files x (dense layer 7 + 3 MoE layers x 11 + MTP layer 11): not a vacuous check
    assert len(fp8_params) == 4 * (7 + 3 * 11 + 11), len(fp8_params)
    return job


def _swap_tensor(a: Path, b: Path, key: str) -> None:
    """Exchange one tensor between two rank files (same shape, so strict loads still pass)."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    ckpt_a, ckpt_b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    ckpt_a["model"][key], ckpt_b["model"][key] = ckpt_b["model"][key], ckpt_a["model"][key]
    torch.save(ckpt_a, a)
    torch.save(ckpt_b, b)


def test_mla_strict_load_rank_files_and_logits(tiny_hf: Callable[[TinySpec], str], tmp_path: Path) -> None:
    hf_dirs = {name: tiny_hf(spec) for name, spec in SPECS.items()}
    jobs = [_convert(case, hf_dirs[case.model], tmp_path / f"case{i}") for i, case in enumerate(CASES)]

    # Negative 1: two EP ranks' files of one (tp, pp) swapped. Local expert indices make keys
    # and shapes agree, so every strict load passes and only the logits can tell.
    ep_swap = Path(shutil.copytree(jobs[0].mcore_dir, tmp_path / "neg_ep_swap"))
    swap_paths(ep_swap / "release" / "mp_rank_01_001_000", ep_swap / "release" / "mp_rank_01_001_001")
    # Negative 2: the kv up-projection shards of TP ranks 0 and 1 exchanged in layer 0 (in
    # every EP rank's copy): heads 0-3 get heads 4-7's keys and values.
    kv_swap = Path(shutil.copytree(jobs[2].mcore_dir, tmp_path / "neg_kv_up_swap"))
    for ep_rank in range(2):
        _swap_tensor(
            kv_swap / "release" / f"mp_rank_00_{ep_rank:03d}" / "model_optim_rng.pt",
            kv_swap / "release" / f"mp_rank_01_{ep_rank:03d}" / "model_optim_rng.pt",
            "decoder.layers.0.self_attention.linear_kv_up_proj.weight",
        )
    negatives = [
        CheckJob(jobs[0].hf_dir, str(ep_swap), jobs[0].layout, check_logits=True),
        CheckJob(jobs[2].hf_dir, str(kv_swap), jobs[2].layout, check_logits=True),
    ]

    all_jobs = jobs + negatives
    results = run_checks(WORLD_SIZE, all_jobs)

    assert_all_ok([r for r in results if r["job"] < len(jobs)], jobs, WORLD_SIZE)
    for index, case in enumerate(CASES):
        job_results = [r for r in results if r["job"] == index]
        # Nothing skipped: every rank opened one file and loaded its chunks, with its EP
        # share of the experts and the MTP layer exactly on the last virtual stage; one rank
        # compared the logits (and the MTP logits) with transformers.
        assert len(job_results) == WORLD_SIZE and all(
            len(r["files"]) == 1 and r["ok"] for r in job_results
        ), index
        layout = case.layout
        for res in job_results:
            assert res["local_experts"] == expected_local_experts(
                layout, res["pp_rank"], res["ep_rank"], NUM_EXPERTS, range(FIRST_DENSE)), (
                index,
                res,
            )
            last_rank = res["pp_rank"] == layout.pp - 1
            assert res["mtp_layers_per_chunk"] == [
                case.mtp if last_rank and c == layout.vpp - 1 else 0 for c in range(layout.vpp)
            ], (index, res)
        diffs = [r["max_abs_diff"] for r in job_results if r["max_abs_diff"] is not None]
        assert len(diffs) == 1 and diffs[0] <= 1e-4, (index, diffs)
        mtp_diffs = [r["mtp_max_abs_diff"] for r in job_results if r["mtp_max_abs_diff"] is not None]
        assert len(mtp_diffs) == (1 if case.mtp else 0) and all(d <= 1e-4 for d in mtp_diffs), (
            index,
            mtp_diffs,
        )
        if case.impl == "transformer_engine" or case.grouped:
            assert all(r["renamed"] > 0 for r in job_results), (index, [r["renamed"] for r in job_results])

    # ETP1: which (tp, ep) pairs exist follows megatron's rank order (ep rank = rank % ep).
    assert sorted({f for r in results if r["job"] == 1 for f in r["files"]}) == [
        "mp_rank_00_000",
        "mp_rank_00_002",
        "mp_rank_01_001",
        "mp_rank_01_003",
    ]

    assert len(all_jobs) == len(jobs) + 2  # two negative controls
    assert_only_negatives_fail(results, all_jobs, WORLD_SIZE, len(jobs))
