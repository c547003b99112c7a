"""Several processes share one conversion (torchrun, or --world_size/--rank): same bytes as one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from fixtures import free_port, read_tree
from helpers import hf_to_mcore
from tiny_models import TinySpec

FLAGS = ["--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2", "--no_progress"]
KEEP_OUT = {"conversion_manifest.json", "conversion_report.json"}  # paths and timings


def test_two_processes_write_what_one_writes(tiny_hf, tmp_path):
    hf = tiny_hf(TinySpec("llama"))
    one, torchrun, manual = str(tmp_path / "one"), str(tmp_path / "torchrun"), str(tmp_path / "manual")
    assert hf_to_mcore(hf, one, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    args = ["--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", hf]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    # torchrun: WORLD_SIZE/RANK/MASTER_* from the launcher; --distributed_convert as in the incumbent's scripts
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "convert_checkpoint", *args, "--save_ckpt_path", torchrun, *FLAGS,
                           "--distributed_convert"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # another launcher: explicit ranks, rank 0's address in MASTER_ADDR/MASTER_PORT
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, "-m", "convert_checkpoint", *args, "--save_ckpt_path", manual, *FLAGS,
                               "--world_size", "2", "--rank", str(r)], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    for out in (torchrun, manual):
        assert read_tree(out, KEEP_OUT) == read_tree(one, KEEP_OUT)
        report = json.load(open(os.path.join(out, "conversion_report.json")))
        assert report["processes"] == 2 and len(report["files"]) == 4
        assert not [n for n in os.listdir(out) if n.startswith("conversion_manifest.rank")]  # merged by rank 0
        manifest = json.load(open(os.path.join(out, "conversion_manifest.json")))
        assert all(v["done"] for v in manifest["files"].values())


def test_rank_flags_are_checked(tiny_hf, tmp_path, capsys):
    hf = tiny_hf(TinySpec("llama"))
    out = str(tmp_path / "out")
    assert hf_to_mcore(hf, out, world_size=2) == 2
    assert "--world_size and --rank go together" in capsys.readouterr().err
    assert hf_to_mcore(hf, out, world_size=2, rank=2) == 2
    assert "--rank 2 is outside --world_size 2" in capsys.readouterr().err
    assert not os.path.exists(out)
