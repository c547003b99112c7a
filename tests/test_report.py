"""conversion_report.json: what a finished conversion says about itself."""
from __future__ import annotations

import json
import os

import torch
from helpers import hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec


def test_report_lists_files_flags_speed_and_coverage(tiny_hf, tmp_path):
    hf = tiny_hf(TinySpec("llama"))
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(hf, mcore, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    report = json.load(open(os.path.join(mcore, "conversion_report.json")))
    on_disk = sorted(os.path.join(d, "model_optim_rng.pt") for d in os.listdir(os.path.join(mcore, "release")))
    assert [f["path"] for f in report["files"]] == on_disk
    for f in report["files"]:
        assert f["bytes"] == os.path.getsize(os.path.join(mcore, "release", f["path"])) and len(f["sha256"]) == 64
    assert report["total_bytes"] > 0
    assert report["direction"] == "hf->mcore" and report["options"]["tensor_model_parallel_size"] == 2
    assert report["seconds"] > 0 and report["gb_per_s"] > 0 and report["peak_rss_bytes"] > 100 * 2**20
    assert report["coverage"]["source_tensors"] == 3 + 4 * 9  # embed, norm, lm_head + 9 per layer
    assert report["fp8"] is None and report["cast"] == [] and report["nonfinite"] == []
    assert mcore_to_hf(mcore, back) == 0
    report = json.load(open(os.path.join(back, "conversion_report.json")))
    assert report["direction"] == "mcore->hf" and report["files"][0]["path"] == "model-00001-of-00001.safetensors"


def test_dry_run_shows_sizes_memory_and_the_placement_table(tiny_hf, tmp_path, capsys):
    from helpers import convert

    hf = tiny_hf(TinySpec("deepseek_v3", mtp_layers=1))
    out = str(tmp_path / "never")
    rc = convert("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", hf,
                 "--save_ckpt_path", out, "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2",
                 "--num-virtual-stages-per-pipeline-rank", "2", "--custom_pipeline_layers", "1,1,1,1",
                 "--expert_parallel_size", "2", "--max_workers", "2", "--dry_run")
    text = capsys.readouterr().out
    assert rc == 0 and not os.path.exists(out)
    assert "GB to write" in text and "GB to read" in text and "predicted peak memory: about" in text and "2 workers" in text
    table = text[text.index("placement"):].splitlines()[1:10]  # header + 2 stages x 2 chunks x 2 EP ranks
    assert table[0].split() == ["stage", "chunk", "EP", "rank", "TP", "ranks", "decoder", "layers", "experts", "MTP", "layers"]
    rows = [line.split() for line in table[1:]]
    # virtual stage = chunk * PP + stage: layer 0 (dense: no experts) on stage 0 chunk 0, layer 3 and the MTP layer on stage 1 chunk 1
    assert rows[0] == ["0", "0", "0", "0-1", "0", "-", "-"]
    assert ["1", "1", "1", "0-1", "3", "2-3", "0"] in rows and ["0", "1", "0", "0-1", "2", "0-1", "-"] in rows


def _plan(hf: str, out: str, **flags):
    from convert_checkpoint.options import parse_options
    from convert_checkpoint.pipeline import build_plan

    argv = ["--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", hf, "--save_ckpt_path", out]
    for k, v in flags.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    opts = parse_options(argv)
    return build_plan(opts.plan_request(None), opts)


def test_memory_budget_bounds_files_in_flight(tiny_hf, tmp_path, capsys):
    hf = tiny_hf(TinySpec("llama"))  # vocab 250 padded to 256: TP rank 1's embedding and output shards compute
    out = str(tmp_path / "out")
    layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, max_workers=2)
    plan = _plan(hf, out, **layout)
    held = {f.relpath: plan.memory_bytes(f) for f in plan.files}
    largest = max(held.values())
    # A file written in place holds only the tensors it computes, not the bytes it moves.
    assert 0 < largest < min(f.nbytes for f in plan.files) / 2
    # A budget that cannot hold one file is refused before anything is written.
    assert hf_to_mcore(hf, out, **layout, max_memory=f"{largest - 1}B") == 2
    assert "--max_memory" in capsys.readouterr().err and not os.path.exists(out)
    # Room for one file at a time: two workers, but never two files in flight.
    assert hf_to_mcore(hf, out, **layout, max_memory=f"{largest}B") == 0
    memory = json.load(open(os.path.join(out, "conversion_report.json")))["memory"]
    assert memory["budget_bytes"] == largest and 0 < memory["max_in_flight_planned_bytes"] <= largest
    out2 = str(tmp_path / "out2")
    assert hf_to_mcore(hf, out2, **layout, max_memory="1GiB") == 0
    memory = json.load(open(os.path.join(out2, "conversion_report.json")))["memory"]
    assert memory["max_in_flight_planned_bytes"] > largest  # with room, two files are built at once


def test_a_byte_move_needs_no_memory_budget_for_its_files(tiny_hf, tmp_path):
    """Files that only move bytes hold nothing: any budget builds them (bit-exact, tested elsewhere);
    an FP8 rank file (pickled through torch.save) holds the whole file."""
    hf = tiny_hf(TinySpec("llama", vocab_size=256, dtype=torch.bfloat16))
    out = str(tmp_path / "out")
    layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    plan = _plan(hf, out, **layout)
    assert all(plan.memory_bytes(f) == 0 for f in plan.files)
    assert hf_to_mcore(hf, out, **layout, max_workers=2, max_memory="1KB") == 0
    fp8 = _plan(tiny_hf(TinySpec("deepseek_v3")), str(tmp_path / "fp8"), convert_to_fp8=True, **layout)
    for f in fp8.files:
        assert fp8.memory_bytes(f) == f.nbytes


def test_report_lists_dtype_casts(tiny_hf, tmp_path):
    """DeepSeek's bf16 router bias is widened to Megatron's fp32: said in the report."""
    hf = tiny_hf(TinySpec("deepseek_v3", mtp_layers=1, dtype=torch.bfloat16))
    out = str(tmp_path / "out")
    assert hf_to_mcore(hf, out) == 0
    casts = json.load(open(os.path.join(out, "conversion_report.json")))["cast"]
    assert {c["tensor"] for c in casts} == {f"decoder.layers.{i}.mlp.router.expert_bias" for i in (1, 2, 3)} | {
        "mtp.layers.0.transformer_layer.mlp.router.expert_bias"}
    assert all(c["from"] == "bfloat16" and c["to"] == "float32" for c in casts)
