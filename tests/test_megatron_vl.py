"""Converted Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE checkpoints against megatron-core 0.16.1 on CPU.

megatron-core 0.16.1 cannot build these models: its multimodal ``LLaVAModel`` takes a CLIP/
SigLIP/InternViT encoder (``vision_model.*``: conv1, class token, learned positions) and a
``vision_projection.*`` MLP, not Qwen's Conv3d patch embedding, 2D-RoPE blocks and patch
merger, and it names the language model ``language_model.*``. The layout written here is
LoongForge's (``foundation_model.`` / ``encoder_model.image_encoder.`` / ``encoder_model.
image_projector.``), whose model class is not public megatron-core. So:

* the language model is checked as megatron-core's own ``GPTModel``: every rank file with its
  ``foundation_model.`` prefix stripped and the ``encoder_model.`` entries set aside loads with
  strict=True into the GPTModel megatron-core builds for that rank, and the logits match
  transformers' ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` made of the same language-model
  weights within 1e-4 (one spawn of 4 workers for every layout); that causal LM is checked here,
  in-process, to give the VL model's own text-only logits;
* the set-aside entries must be exactly the vision tower, its merger and the text-encoder
  embedding copy (which must equal the embedding); their names and shapes are checked against
  LoongForge's convert YAMLs in tests/test_vl.py.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from fixtures import MegatronCase, convert_case
from mcore_harness import CheckJob, Layout, assert_all_ok, job_problems, run_checks
from tiny_models import TinySpec

WORLD_SIZE = 4
SPECS = {"qwen2_5_vl": TinySpec("qwen2_5_vl"), "qwen3_vl": TinySpec("qwen3_vl"),
         "qwen2_5_vl_tied": TinySpec("qwen2_5_vl", tied=True), "qwen3_vl_moe": TinySpec("qwen3_vl_moe", mlp_only_layers=(0,))}
CASES = [
    MegatronCase("qwen2_5_vl", Layout(2, 2, 1, (1, 3)), custom="1,3"),
    MegatronCase("qwen2_5_vl", Layout(2, 1, 1, (4,)), impl="transformer_engine"),
    MegatronCase("qwen3_vl", Layout(2, 2, 1, (3, 1)), impl="transformer_engine", custom="3,1"),
    MegatronCase("qwen3_vl", Layout(1, 2, 1, (2, 2))),
    MegatronCase("qwen2_5_vl_tied", Layout(2, 2, 1, (2, 2))),
    MegatronCase("qwen3_vl_moe", Layout(2, 1, 1, (4,), ep=2)),
    MegatronCase("qwen3_vl_moe", Layout(1, 2, 1, (1, 3), ep=2, etp=1), impl="transformer_engine", grouped=True, custom="1,3"),
]
LANGUAGE, ENCODER = "foundation_model.", "encoder_model."
LM_TYPES = {"qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3", "qwen3_vl_moe_text": "qwen3_moe"}


def _causal_lm_view(vl_dir: str, out: Path) -> str:
    """The VL checkpoint's language model as a transformers causal LM (same weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    vl = AutoModelForImageTextToText.from_pretrained(vl_dir, dtype=torch.float32)
    text = vl.config.text_config
    config = json.loads(text.to_json_string())
    config.update(model_type=LM_TYPES[text.model_type], tie_word_embeddings=vl.config.tie_word_embeddings,
                  architectures=None)
    if "num_local_experts" in config or "num_experts" in config:  # Qwen3-VL-MoE's router always renormalizes its top-k weights
        config["norm_topk_prob"] = True
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"]}
    from transformers import AutoConfig

    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    weights = {"model." + k: v for k, v in vl.model.language_model.state_dict().items()}
    weights["lm_head.weight"] = vl.lm_head.weight
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ids = torch.arange(3, 3 + 12).unsqueeze(0)
    with torch.no_grad():  # text only: M-RoPE with equal t/h/w positions is plain RoPE
        torch.testing.assert_close(vl(input_ids=ids).logits, lm(input_ids=ids).logits, rtol=0, atol=1e-5, msg=lambda m: f"{vl_dir}: {m}")
    lm.save_pretrained(str(out))
    return str(out)


def _language_rank_files(mcore_dir: str, out: Path) -> str:
    """Rank files with the language model's prefix stripped and the encoder entries set aside;
    what is set aside must be the tower, the merger and an exact embedding copy."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    release = Path(mcore_dir, "release")
    for rank_file in sorted(release.glob("*/model_optim_rng.pt")):
        ckpt = torch.load(rank_file, map_location="cpu", weights_only=True)
        for key in [k for k in ckpt if k.startswith("model")]:
            sd = ckpt[key]
            other = sorted(k for k in sd if not k.startswith((LANGUAGE, ENCODER)))
            assert not other, (rank_file, other[:3])
            encoder = {k for k in sd if k.startswith(ENCODER)}
            assert all(k.startswith((ENCODER + "image_encoder.", ENCODER + "image_projector.",
                                     ENCODER + "text_encoder.word_embeddings.weight")) for k in encoder)
            copy = sd.get(ENCODER + "text_encoder.word_embeddings.weight")
            if copy is not None:
                assert torch.equal(copy, sd[LANGUAGE + "embedding.word_embeddings.weight"])
            ckpt[key] = {k[len(LANGUAGE):]: v for k, v in sd.items() if k.startswith(LANGUAGE)}
        target = out / "release" / rank_file.parent.name / rank_file.name
        target.parent.mkdir(parents=True)
        torch.save(ckpt, target)
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    return str(out)


def test_language_model_strict_load_and_logits(tiny_hf, tmp_path: Path) -> None:
    vl_dirs = {name: tiny_hf(spec) for name, spec in SPECS.items()}
    lm_dirs = {name: _causal_lm_view(d, tmp_path / f"lm_{name}") for name, d in vl_dirs.items()}
    jobs = []
    for i, case in enumerate(CASES):
        job = convert_case(case, lm_dirs[case.model], tmp_path / f"case{i}", source_dir=vl_dirs[case.model])
        view = _language_rank_files(job.mcore_dir, tmp_path / f"case{i}_language")
        jobs.append(CheckJob(job.hf_dir, view, job.layout, te_names=job.te_names, check_logits=True,
                             grouped_gemm=job.grouped_gemm,
                             tied=case.model.endswith("_tied")))
    # Negative: the vision tower's qkv is not in the language view, so check the view can fail:
    # layer 0's fc1 of case 0 with its gate and up halves exchanged (same keys and shapes).
    negative = Path(shutil.copytree(jobs[0].mcore_dir, tmp_path / "neg_fc1_swap"))
    for rank_file in sorted(negative.glob("release/*_000/model_optim_rng.pt")):
        ckpt = torch.load(rank_file, map_location="cpu", weights_only=True)
        fc1 = ckpt["model"]["decoder.layers.0.mlp.linear_fc1.weight"]
        ckpt["model"]["decoder.layers.0.mlp.linear_fc1.weight"] = torch.cat(fc1.chunk(2)[::-1])
        torch.save(ckpt, rank_file)
    all_jobs = [*jobs, CheckJob(jobs[0].hf_dir, str(negative), jobs[0].layout, check_logits=True)]
    results = run_checks(WORLD_SIZE, all_jobs)
    assert_all_ok([r for r in results if r["job"] < len(jobs)], jobs, WORLD_SIZE)
    for index in range(len(jobs)):
        job_results = [r for r in results if r["job"] == index]
        assert len(job_results) == WORLD_SIZE and all(r["ok"] for r in job_results), index
        diffs = [r["max_abs_diff"] for r in job_results if r["max_abs_diff"] is not None]
        assert len(diffs) == 1 and diffs[0] <= 1e-4, (index, diffs)
    problems = job_problems(results, all_jobs, WORLD_SIZE)
    assert sorted(problems) == [len(jobs)], problems
    assert "logits max|diff|" in "\n".join(problems[len(jobs)])
