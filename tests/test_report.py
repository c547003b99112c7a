"""conversion_report.json: what a finished conversion says about itself."""
from __future__ import annotations

import json
import os

from helpers import hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec


def test_report_lists_files_flags_speed_and_coverage(tiny_hf, tmp_path):
    hf = tiny_hf(TinySpec("llama"))
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(hf, mcore, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    report = json.load(open(os.path.join(mcore, "conversion_report.json")))
    on_disk = sorted(os.path.join(d, "model_optim_rng.pt") for d in os.listdir(os.path.join(mcore, "release")))
    assert [f["path"] for f in report["files"]] == on_disk
    assert report["total_bytes"] == sum(f["bytes"] for f in report["files"]) > 0
    assert report["direction"] == "hf->mcore" and report["options"]["tensor_model_parallel_size"] == 2
    assert report["seconds"] > 0 and report["gb_per_s"] > 0 and report["peak_rss_bytes"] > 100 * 2**20
    assert report["coverage"]["source_tensors"] == 3 + 4 * 9  # embed, norm, lm_head + 9 per layer
    assert report["fp8"] is None
    assert mcore_to_hf(mcore, back) == 0
    report = json.load(open(os.path.join(back, "conversion_report.json")))
    assert report["direction"] == "mcore->hf" and report["files"][0]["path"] == "model-00001-of-00001.safetensors"
