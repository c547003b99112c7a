"""Interrupted conversions: a killed run and a full disk resume to the bytes of an uninterrupted run."""
from __future__ import annotations

import json
import os

from convert_checkpoint.manifest import MANIFEST_NAME
from fixtures import read_tree
from helpers import cli_to_mcore, hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec

LAYOUT = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)  # 4 rank files
KEEP_OUT = {MANIFEST_NAME, "conversion_report.json"}  # their contents record paths and timings


def _cli(src: str, out: str, *extra: str, fault: str | None = None):
    return cli_to_mcore(src, out, "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2", *extra,
                        fault=fault)


def _stamps(root: str, rels) -> dict[str, tuple[int, int]]:
    return {r: (os.stat(os.path.join(root, r)).st_ino, os.stat(os.path.join(root, r)).st_mtime_ns) for r in rels}


def test_killed_run_resumes_to_identical_bytes(tiny_hf, tmp_path):
    hf = tiny_hf(TinySpec("llama"))
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert hf_to_mcore(hf, whole, **LAYOUT) == 0
    proc = _cli(hf, killed, fault="kill_after=2")
    assert proc.returncode == -9, proc.stderr  # SIGKILL after two files
    manifest = json.load(open(os.path.join(killed, MANIFEST_NAME)))
    done = sorted("release/" + k for k, v in manifest["files"].items() if v["done"])
    assert len(done) == 2 and len(manifest["files"]) == 4
    assert not os.path.exists(os.path.join(killed, "latest_checkpointed_iteration.txt"))  # not taken for finished
    before = _stamps(killed, done)
    proc = _cli(hf, killed, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "2 finished earlier, verified and kept" in proc.stderr
    assert _stamps(killed, done) == before  # no file written twice
    assert read_tree(killed, KEEP_OUT) == read_tree(whole, KEEP_OUT)
    report = json.load(open(os.path.join(killed, "conversion_report.json")))
    assert sum(1 for f in report["files"] if f.get("reused")) == 2


def test_full_disk_then_resume(tiny_hf, tmp_path):
    hf = tiny_hf(TinySpec("llama"))
    whole, out = str(tmp_path / "whole"), str(tmp_path / "out")
    assert hf_to_mcore(hf, whole, **LAYOUT) == 0
    proc = _cli(hf, out, fault="enospc_after=1")
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert "No space left on device" in err and "1 of 4 files are finished and kept" in err and "--resume" in err
    leftovers = [n for _, _, names in os.walk(out) for n in names if ".tmp-" in n]
    assert leftovers == []  # the partial file was removed
    proc = _cli(hf, out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert read_tree(out, KEEP_OUT) == read_tree(whole, KEEP_OUT)


def test_resume_refuses_another_plan_and_checks_finished_files(tiny_hf, tmp_path, capsys):
    hf = tiny_hf(TinySpec("llama"))
    out = str(tmp_path / "out")
    assert hf_to_mcore(hf, out, **LAYOUT) == 0
    # A different plan (TP=1) must not mix its files with these.
    assert hf_to_mcore(hf, out, pipeline_model_parallel_size=2, resume=True) == 2
    assert "written by a different plan" in capsys.readouterr().err
    # A finished file damaged after the run is found by its sha256 and rebuilt.
    victim = os.path.join(out, "release", "mp_rank_01_001", "model_optim_rng.pt")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    assert hf_to_mcore(hf, out, **LAYOUT, resume=True) == 0
    assert "3 finished earlier, verified and kept" in capsys.readouterr().err
    back = str(tmp_path / "back")
    assert mcore_to_hf(out, back) == 0
    # Nothing to resume in an empty or foreign directory.
    assert hf_to_mcore(hf, str(tmp_path / "empty"), **LAYOUT, resume=True) == 2
    assert "nothing to resume" in capsys.readouterr().err
