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
  LoongForge's convert YAMLs in tests/test_vl.py;
* the tower's blocks are megatron-core's own ``TransformerBlock`` (local spec, bidirectional
  attention): each rank file's ``encoder_model.image_encoder.decoder.*`` loads strictly into the
  block built at the encoder TP size, and its output equals transformers' vision blocks within
  1e-4 (tests/vl_vision_probe.py; rotary angle 0 on both sides, since megatron-core has no
  Qwen 2D vision RoPE). The patch embedding, position table and mergers have no megatron-core
  module: they are checked by name and value in tests/test_vl.py.
"""
from __future__ import annotations

import argparse
import json
import os
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


def test_vision_tower_strict_load_and_output(tiny_hf, tmp_path: Path) -> None:
    """Each rank file's tower in megatron-core's TransformerBlock (tests/vl_vision_probe.py, one
    spawn of 2): strict load at encoder TP 1 and 2, output equal to transformers' blocks within
    1e-4; a negative (qkv of layer 1 rolled by one head in every file) must fail on the output."""
    import subprocess
    import sys

    from helpers import hf_to_mcore

    jobs = []
    for name, enc in (("qwen2_5_vl", 2), ("qwen3_vl", 2), ("qwen3_vl", 1), ("qwen3_vl_moe", 1)):
        hf_dir = tiny_hf(SPECS[name])
        out = tmp_path / f"{name}_enc{enc}"
        assert hf_to_mcore(hf_dir, str(out), tensor_model_parallel_size=2, encoder_tensor_model_parallel_size=enc,
                           transformer_impl="local", expert_parallel_size=2 if name.endswith("moe") else None) == 0
        dirs = sorted(os.listdir(out / "release"))
        # process r loads rank_dirs[r]: at encoder TP 2 its own TP shard, at 1 (two data-parallel
        # copies) the first and the last file, each of which must hold the whole tower
        jobs.append({"family": name, "hf_dir": hf_dir, "mcore_dir": str(out), "tp": enc, "rank_dirs": [dirs[0], dirs[-1]]})
    negative = Path(shutil.copytree(jobs[0]["mcore_dir"], tmp_path / "neg"))
    torch.serialization.add_safe_globals([argparse.Namespace])
    for rank_file in sorted(negative.glob("release/*/model_optim_rng.pt")):
        ckpt = torch.load(rank_file, map_location="cpu", weights_only=True)
        key = "encoder_model.image_encoder.decoder.layers.1.self_attention.linear_qkv.weight"
        ckpt["model"][key] = torch.roll(ckpt["model"][key], 24, 0)  # one head's [q; k; v] rows
        torch.save(ckpt, rank_file)
    jobs.append(dict(jobs[0], mcore_dir=str(negative)))
    spec_file = tmp_path / "jobs.json"
    spec_file.write_text(json.dumps(jobs))
    probe = os.path.join(os.path.dirname(__file__), "vl_vision_probe.py")
    out = tmp_path / "probe"
    out.mkdir()
    proc = subprocess.run([sys.executable, probe, str(spec_file), "2", str(out)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [r for rank in (0, 1) for r in json.loads((out / f"rank{rank}.json").read_text())]
    assert len(results) == 2 * len(jobs), results
    for r in results:
        assert r["ok"], r
        assert r["loaded"] > 0
        if r["job"] < len(jobs) - 1:
            assert r["max_abs_diff"] <= 1e-4, r
        else:
            assert r["max_abs_diff"] > 1e-3, r
