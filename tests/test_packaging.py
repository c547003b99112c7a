"""The built wheel is self-contained: it ships the family YAMLs and py.typed, and an install of it
converts a model with no help from the repository checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from fixtures import load_hf_tensors
from helpers import assert_same_tensors
from tiny_models import TinySpec, make_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe", "gpt_oss", "llama", "minimax_m2", "mixtral", "qwen2",
            "qwen2_5_vl", "qwen2_moe", "qwen3", "qwen3_5", "qwen3_5_moe", "qwen3_moe", "qwen3_next", "qwen3_vl", "qwen3_vl_moe")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd}\nrc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_ships_families_and_converts_standalone(tmp_path):
    # Build from a clean copy of the sources, not the checkout itself: setuptools builds in-tree,
    # and a stale build/lib or *.egg-info left by an earlier build would put files into the wheel
    # that the current package-data no longer ships (and hide exactly the bug tested here). The
    # copy also keeps build/ and egg-info out of the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "tools"), src / "tools",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("convert_checkpoint-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "convert_checkpoint/py.typed" in names
    for family in FAMILIES:
        assert f"convert_checkpoint/configs/models/{family}/ckpt_convert/{family}_convert.yaml" in names, family
    assert "convert_checkpoint/configs/models/llama/llama3_8b.yaml" in names
    assert not any(n.startswith("convert_checkpoint/configs/") and n.endswith(".py") for n in names)

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q",
          "--target", str(site), str(wheel)])

    # Run from an unrelated directory with only the install on PYTHONPATH. PYTHONPATH entries come
    # before site-packages, where the editable install of this checkout lives (a .pth naming
    # tools/), so the wheel's copy wins; the first check below asserts that it does.
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    env.pop("PYTHONSAFEPATH", None)
    probe = _run([sys.executable, "-c",
                  "import convert_checkpoint, convert_checkpoint.config.family as f; "
                  "print(convert_checkpoint.__file__); print(f.CONFIG_ROOT); print(','.join(sorted(f.builtin_families())))"],
                 cwd=work, env=env)
    module_file, config_root, families = probe.stdout.strip().splitlines()
    assert os.path.realpath(module_file).startswith(os.path.realpath(site) + os.sep), module_file
    assert os.path.realpath(config_root).startswith(os.path.realpath(site) + os.sep), config_root
    assert tuple(families.split(",")) == FAMILIES

    # A real conversion through the installed package: HF -> MCore TP=2 -> HF, bit-exact.
    hf_dir = make_tiny_model(TinySpec("llama"), str(tmp_path / "hf"))
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    _run([sys.executable, "-m", "convert_checkpoint", "--load_platform", "huggingface", "--save_platform", "mcore",
          "--load_ckpt_path", hf_dir, "--save_ckpt_path", str(mcore), "--tensor_model_parallel_size", "2",
          "--no_progress"], cwd=work, env=env)
    for rank in ("mp_rank_00", "mp_rank_01"):
        assert (mcore / "release" / rank / "model_optim_rng.pt").is_file(), rank
    _run([sys.executable, "-m", "convert_checkpoint", "--load_platform", "mcore", "--save_platform", "huggingface",
          "--load_ckpt_path", str(mcore), "--save_ckpt_path", str(back), "--no_progress"], cwd=work, env=env)
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(str(back)))  # torch.equal per tensor
