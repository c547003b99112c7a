"""Shared test helpers: run the converter in-process and compare checkpoints exactly."""
from __future__ import annotations

import os

import torch

from convert_checkpoint.cli import main


def convert(*args: str, **flags) -> int:
    """The command line in this process. One worker and no read-ahead unless a test asks: the
    tests' monkeypatches must see the conversion, and forking the test process for every small
    conversion would only slow the suite (``--max_workers auto`` has its own tests)."""
    argv = list(args)
    if argv[:1] not in (["verify"], ["verify-kt"]):  # the commands that convert
        if not any(k.replace("-", "_") == "max_workers" for k in flags) and "--max_workers" not in argv:
            flags["max_workers"] = 1
        argv.append("--no_prefetch")
    for k, v in flags.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not None and v is not False:
            argv += [f"--{k}", str(v)]
    return main(argv + ["--no_progress"])


def hf_to_mcore(hf_dir: str, out: str, **flags) -> int:
    return convert("--load_platform", "huggingface", "--save_platform", "mcore",
                   "--load_ckpt_path", hf_dir, "--save_ckpt_path", out, **flags)


def mcore_to_hf(mcore_dir: str, out: str, **flags) -> int:
    return convert("--load_platform", "mcore", "--save_platform", "huggingface",
                   "--load_ckpt_path", mcore_dir, "--save_ckpt_path", out, **flags)


def hf_to_mcore_at(hf_dir: str, out: str, layout, impl: str, grouped: bool = False, **flags) -> None:
    """HF -> MCore at a harness ``Layout``; the VPP and ETP flags are given only when they differ
    from the converter's defaults, so those defaults are what gets tested."""
    rc = hf_to_mcore(
        hf_dir, out,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp if layout.etp != layout.tp else None,
        transformer_impl=impl,
        **{"num-virtual-stages-per-pipeline-rank": layout.vpp if layout.vpp > 1 else None, "moe-grouped-gemm": grouped},
        **flags,
    )
    assert rc == 0, (hf_dir, layout)


def swap_paths(a, b) -> None:
    """Exchange two files or directories (negative controls: swapped rank files)."""
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), f"key sets differ: only left {sorted(set(a) - set(b))[:5]}, only right {sorted(set(b) - set(a))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{k}: dtype {a[k].dtype} != {b[k].dtype}"
        assert torch.equal(bits(a[k]), bits(b[k])), f"{k}: values differ"


def bits(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors compared as their bytes (torch has no FP8 comparisons; NaN codes compare too)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def rank_files(mcore_dir: str) -> dict[str, dict]:
    root = os.path.join(mcore_dir, "release")
    return {d: torch.load(os.path.join(root, d, "model_optim_rng.pt"), weights_only=True)
            for d in sorted(os.listdir(root))}


class DictReader:
    """A LeafReader over in-memory tensors (expression unit tests)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def read_into(self, leaf, out):
        t = self.tensors[leaf.ref.name]
        for dim, (o, s) in enumerate(zip(leaf.offsets, leaf.shape)):
            t = t.narrow(dim, o, s)
        out.copy_(t)


def expr_leaf(name, t):
    """A leaf over the whole of tensor ``t`` named ``name`` in file "f"."""
    from convert_checkpoint import tensor_expr

    return tensor_expr.source(tensor_expr.TensorRef("f", name), t.dtype, t.shape)


def cli_to_mcore(src: str, out: str, *extra: str, fault: str | None = None):
    """``python -m convert_checkpoint`` HF -> MCore in a subprocess (one worker: files in order),
    with ``CONVERT_CHECKPOINT_FAULT`` set to ``fault`` (the kill and full-disk hooks)."""
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("CONVERT_CHECKPOINT_FAULT", None)
    if fault:
        env["CONVERT_CHECKPOINT_FAULT"] = fault
    cmd = [sys.executable, "-m", "convert_checkpoint", "--load_platform", "huggingface", "--save_platform", "mcore",
           "--load_ckpt_path", src, "--save_ckpt_path", out, "--no_progress", "--max_workers", "1", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


# Runs the CLI with torch made unimportable: the parent and its forked workers share the hook,
# so any import of torch anywhere fails the conversion.
_NO_TORCH = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported during a conversion that only moves bytes")
sys.meta_path.insert(0, _Refuse())
from convert_checkpoint.cli import main
sys.exit(main(sys.argv[1:]))
"""


def without_torch(*argv: str):
    """``convert-checkpoint ARGV`` in a subprocess where importing torch fails (workers included)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _NO_TORCH, *argv, "--no_progress"], capture_output=True, text=True,
                          timeout=300)
