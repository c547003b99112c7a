"""Converted Qwen3-Next (qwen3_next) and Qwen3.5 (qwen3_5, qwen3_5_moe) checkpoints against a real
megatron-core GPTModel on CPU.

Megatron-core 0.16 builds these hybrids with get_transformer_block_with_experimental_attention_variant_spec
(GatedDeltaNet layers where linear_attention_freq says 1, self-attention with attention_output_gate
elsewhere), which it offers only with Transformer Engine; the harness builds the same per-layer
specs from local modules (mcore_harness._hybrid_block_spec): megatron's own GatedDeltaNet,
SelfAttention, MoE layer and GPTModel, a ColumnParallelLinear in_proj with the input norm before
it (TE-named files are renamed by the layer's key map, in_proj.layer_norm_weight ->
input_layernorm.weight), a zero-centered RMSNorm stand-in for the norms (WQ1: torch's wrapped norm
refuses layernorm_zero_centered_gamma) and the gated delta rule on megatron's own torch path
(deterministic_mode; WQ2: FLA's l2norm replaced by its formula) instead of FLA's Triton kernels.

Every rank file loads with strict=True into the model megatron-core builds for its rank (so its
key set and shapes are that model's), and the logits of the whole pipeline match transformers'
within 1e-4. torch_dist both ways: megatron's dist_checkpointing loads what the converter writes
(per-layer keys, GatedDeltaNet's in_proj / conv1d one key per block) at TP2 PP2 EP2 and PP2 EP2
with logits, and the converter reads what megatron-core saves back to the HF weights bit for bit.
The MTP head of Qwen3-Next and Qwen3.5 (megatron's MTP layer over the last layer's
spec: full attention, MoE or dense): transformers has no MTP module, so its reference is transformers' own decoder
layer, norms and LM head with the HF MTP weights (mcore_harness._qwen3_next_mtp_as_decoder_layer
rewrites them the way _hf_mtp_logits reads DeepSeek's), within 1e-4 too.
One spawn of 4 workers runs every layout.
"""
from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from fixtures import MegatronCase, convert_case, expected_local_experts, load_hf_tensors
from helpers import assert_same_tensors, hf_to_mcore, mcore_to_hf
from mcore_harness import CheckJob, Layout, assert_all_ok, job_problems, run_checks
from tiny_models import TinySpec

WORLD_SIZE = 4
NUM_EXPERTS = 4
SPECS = {
    # full attention on layers 1 and 3, layer 0 dense (mlp_only_layers), the rest MoE
    "next": TinySpec("qwen3_next", full_attention=(1, 3), mlp_only_layers=(0,)),
    "q35": TinySpec("qwen3_5", mtp_layers=1),  # dense, full attention on layer 3; the MTP head
    "q35_moe": TinySpec("qwen3_5_moe", full_attention=(0, 2)),
    # the MTP head (mtp.fc, norms, mtp.layers.0: full attention + MoE), as published
    "next_mtp": TinySpec("qwen3_next", full_attention=(1, 3), mtp_layers=1),
}
DENSE = {"next": range(1), "q35": range(4), "q35_moe": range(0), "next_mtp": range(0)}

CASES = [
    # TP 2 (delta-net heads and in_proj blocks split), uneven PP, experts over EP 2 with ETP 1, local names.
    MegatronCase("next", Layout(2, 2, 1, (1, 3), ep=2, etp=1), custom="1,3"),
    # TE names (in_proj.layer_norm_weight, linear_qkv.layer_norm_weight), EP 2 x ETP 2.
    MegatronCase("next", Layout(2, 1, 1, (4,), ep=2), impl="transformer_engine"),
    # Qwen3.5 dense: TP 2, PP 3+1, TE names (fused dense pre-MLP norm too), its MTP layer on stage 1.
    MegatronCase("q35", Layout(2, 2, 1, (3, 1)), impl="transformer_engine", custom="3,1"),
    # Qwen3.5 MoE: PP 2, EP 2, local names; then TP 2 with whole experts and grouped-GEMM TE names.
    MegatronCase("q35_moe", Layout(1, 2, 1, (2, 2), ep=2)),
    MegatronCase("q35_moe", Layout(2, 1, 1, (4,), ep=2, etp=1), impl="transformer_engine", grouped=True),
    # Qwen3-Next's MTP layer on the last stage, TE names; its logits too.
    MegatronCase("next_mtp", Layout(2, 2, 1, (1, 3), ep=2, etp=1), impl="transformer_engine", custom="1,3"),
]


# torch_dist (TE names, as megatron's TE-only hybrid block saves them; layout-free, per-layer
# keys, in_proj / conv1d one key per block) loaded by megatron's dist_checkpointing at a layout.
DIST_LOADS = [("next_mtp", Layout(2, 2, 1, (1, 3), ep=2, etp=1)), ("q35_moe", Layout(1, 2, 1, (2, 2), ep=2))]
# TE rank files loaded at this layout, then saved by megatron-core's own dist_checkpointing.save;
# the converter reads that back to HF.
DIST_SAVE = ("next", Layout(2, 1, 1, (4,), ep=2))


def _swap_in_proj_blocks(mcore_dir: Path, layer_key: str, v_rows: tuple[int, int], z_rows: tuple[int, int]) -> None:
    """Exchange the v and z blocks of one in_proj in every rank file that holds it (same shapes)."""
    for rank_file in sorted(mcore_dir.glob("release/*/model_optim_rng.pt")):
        ckpt = torch.load(rank_file, map_location="cpu", weights_only=False)
        weight = ckpt["model"].get(layer_key)
        if weight is None:
            continue
        v, z = weight[v_rows[0]:v_rows[1]].clone(), weight[z_rows[0]:z_rows[1]].clone()
        weight[v_rows[0]:v_rows[1]], weight[z_rows[0]:z_rows[1]] = z, v
        torch.save(ckpt, rank_file)


def test_strict_load_rank_files_and_logits(tiny_hf: Callable[[TinySpec], str], tmp_path: Path) -> None:
    hf_dirs = {name: tiny_hf(spec) for name, spec in SPECS.items()}
    jobs = [convert_case(case, hf_dirs[case.model], tmp_path / f"case{i}") for i, case in enumerate(CASES)]
    # Negative: in layer 0 (a delta-net layer) the v and z blocks of each TP rank's in_proj
    # exchanged (4 key heads of 8, 8 value heads of 16 -> per rank q 16, k 16, v 64, z 64 rows):
    # keys and shapes agree, only the logits can tell.
    swapped = Path(shutil.copytree(jobs[0].mcore_dir, tmp_path / "neg_in_proj_swap"))
    _swap_in_proj_blocks(swapped, "decoder.layers.0.self_attention.in_proj.weight", (32, 96), (96, 160))
    # Negative: the MTP layer's enorm and hnorm exchanged (same shapes): only its logits can tell.
    mtp_case = next(i for i, case in enumerate(CASES) if SPECS[case.model].mtp_layers)
    mtp_swap = Path(shutil.copytree(jobs[mtp_case].mcore_dir, tmp_path / "neg_mtp_norm_swap"))
    for rank_file in sorted(mtp_swap.glob("release/*/model_optim_rng.pt")):
        ckpt = torch.load(rank_file, map_location="cpu", weights_only=False)
        model = ckpt["model"]
        if "mtp.layers.0.enorm.weight" in model:
            model["mtp.layers.0.enorm.weight"], model["mtp.layers.0.hnorm.weight"] = (
                model["mtp.layers.0.hnorm.weight"], model["mtp.layers.0.enorm.weight"])
            torch.save(ckpt, rank_file)
    negatives = [CheckJob(jobs[0].hf_dir, str(swapped), jobs[0].layout, check_logits=True),
                 dataclasses.replace(jobs[mtp_case], mcore_dir=str(mtp_swap))]
    dist_jobs = []
    for i, (model, layout) in enumerate(DIST_LOADS):
        out = str(tmp_path / f"dist{i}")
        assert hf_to_mcore(hf_dirs[model], out, ckpt_format="torch_dist", transformer_impl="transformer_engine") == 0
        dist_jobs.append(CheckJob(hf_dirs[model], out, layout, check_logits=True, ckpt_format="torch_dist"))
    saved = tmp_path / "megatron_saved"
    save_job = dataclasses.replace(
        convert_case(MegatronCase(DIST_SAVE[0], DIST_SAVE[1], impl="transformer_engine"), hf_dirs[DIST_SAVE[0]],
                     tmp_path / "legacy_for_save"), check_logits=False, save_torch_dist=str(saved))
    positives = jobs + dist_jobs + [save_job]

    all_jobs = positives + negatives
    results = run_checks(WORLD_SIZE, all_jobs)

    assert_all_ok([r for r in results if r["job"] < len(positives)], positives, WORLD_SIZE)
    for index, (model, _) in enumerate(DIST_LOADS, start=len(jobs)):
        diffs = [r["max_abs_diff"] for r in results if r["job"] == index and r["max_abs_diff"] is not None]
        assert len(diffs) == 1 and diffs[0] <= 1e-4, (index, diffs)
        mtp_diffs = [r["mtp_max_abs_diff"] for r in results if r["job"] == index and r["mtp_max_abs_diff"] is not None]
        assert len(mtp_diffs) == SPECS[model].mtp_layers and all(d <= 1e-4 for d in mtp_diffs), (index, mtp_diffs)
    # megatron's own save holds no args: the architecture comes from the HF config
    back = str(tmp_path / "back_from_megatron")
    assert (saved / "release" / ".metadata").is_file()
    assert mcore_to_hf(str(saved), back, hf_config_path=hf_dirs[DIST_SAVE[0]]) == 0
    assert_same_tensors(load_hf_tensors(hf_dirs[DIST_SAVE[0]]), load_hf_tensors(back))
    for index, case in enumerate(CASES):
        job_results = [r for r in results if r["job"] == index]
        assert len(job_results) == WORLD_SIZE and all(len(r["files"]) == 1 and r["ok"] for r in job_results), index
        layout = case.layout
        mtp = SPECS[case.model].mtp_layers
        for res in job_results:
            assert res["layers_per_chunk"] == [layout.layers_per_vstage[res["pp_rank"]]], (index, res)
            assert res["mtp_layers_per_chunk"] == [mtp if res["pp_rank"] == layout.pp - 1 else 0], (index, res)
            if SPECS[case.model].family != "qwen3_5":
                assert res["local_experts"] == expected_local_experts(
                    layout, res["pp_rank"], res["ep_rank"], NUM_EXPERTS, DENSE[case.model]), (index, res)
        diffs = [r["max_abs_diff"] for r in job_results if r["max_abs_diff"] is not None]
        assert len(diffs) == 1 and diffs[0] <= 1e-4, (index, diffs)
        mtp_diffs = [r["mtp_max_abs_diff"] for r in job_results if r["mtp_max_abs_diff"] is not None]
        assert len(mtp_diffs) == (1 if mtp else 0) and all(d <= 1e-4 for d in mtp_diffs), (index, mtp_diffs)
        if case.impl == "transformer_engine" or case.grouped:
            assert all(r["renamed"] > 0 for r in job_results), index

    problems = job_problems(results, all_jobs, WORLD_SIZE)
    first = len(positives)
    assert sorted(problems) == [first, first + 1], problems
    assert "logits max|diff|" in "\n".join(problems[first]), problems[first]
    assert problems[first + 1] == [p for p in problems[first + 1] if p.startswith("MTP logits max|diff|")], (
        problems[first + 1])  # the main logits still match
    assert all(r["ok"] for r in results if r["job"] >= first)  # strict loads passed
