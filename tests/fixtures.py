"""Test helpers shared by several test files and fixture builders, each defined once here.

Module-level imports are standard-library only: ``mcore_harness`` imports this module in its
worker processes before they patch torch for CPU (see its docstring), so torch, safetensors,
the converter and the sibling test modules are imported inside the functions that need them.
"""
from __future__ import annotations

import json
import os
import socket
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mcore_harness import CheckJob, Layout


def load_hf_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor in the ``*.safetensors`` files of a directory, the files read in name order.

    With a ``model.safetensors.index.json`` the index must name exactly the shard files present
    and place every tensor in the file that holds it; a tensor name in two files is an error."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    weight_map = None
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        named = sorted(set(weight_map.values()))
        assert named == files, f"{path}: index names {named}, the directory holds {files}"
    out, where = {}, {}
    for file in files:
        with safe_open(os.path.join(path, file), "pt") as f:
            for k in f.keys():
                assert k not in where, f"{path}: {k} in both {where[k]} and {file}"
                out[k], where[k] = f.get_tensor(k), file
    if weight_map is not None:
        wrong = sorted(k for k in set(where) | set(weight_map) if where.get(k) != weight_map.get(k))
        assert not wrong, f"{path}: index and files disagree on {wrong[:5]}"
    return out


def assert_fails(capsys, rc: int, out_dir: str, *fragments: str) -> None:
    """A run that must stop on bad input: exit code 2, one error line holding every fragment,
    and nothing written to ``out_dir``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err  # one line
    assert err[0].startswith("convert-checkpoint: error: ")
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not os.path.exists(out_dir) or os.listdir(out_dir) == [], "output was written"


def read_tree(root: str, skip: Collection[str] = ()) -> dict[str, bytes]:
    """The bytes of every file under ``root`` by its path relative to ``root``, except the
    relative paths in ``skip`` (files whose contents record paths or timings)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in skip:
                with open(os.path.join(dirpath, name), "rb") as f:
                    out[rel] = f.read()
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dequantize_fp8_blocks(codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                          shape: tuple[int, int] | None = None, block: int = 128) -> torch.Tensor:
    """The oracle for DeepSeek / TE block FP8: ``codes * scale_inv`` per ``block x block`` tile,
    in ``dtype``. ``codes`` are e4m3 values or their uint8 bits; ``scale_inv`` has one entry per
    tile (extra padded rows or columns are ignored); ``shape`` is the weight's (rows, cols),
    ``codes.shape`` if not given. Written out here, independently of the converter's code."""
    import torch

    rows, cols = codes.shape if shape is None else shape
    full = scale_inv.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (codes.view(torch.float8_e4m3fn).float() * full).to(dtype)


@dataclass(frozen=True)
class MegatronCase:
    """One HF -> MCore conversion checked against megatron-core by ``mcore_harness``."""

    model: str  # key of the test file's HF models
    layout: Layout
    impl: str = "local"  # --transformer_impl
    grouped: bool = False  # --moe-grouped-gemm
    custom: str | None = None  # --custom_pipeline_layers


def convert_case(case: MegatronCase, hf_dir: str, out: Path, source_dir: str | None = None) -> CheckJob:
    """Convert ``source_dir`` (default ``hf_dir``) to MCore at ``out`` with the case's layout and
    flags; the returned job checks the rank files and logits against the HF model in ``hf_dir``."""
    from helpers import hf_to_mcore_at
    from mcore_harness import CheckJob

    hf_to_mcore_at(source_dir or hf_dir, str(out), case.layout, case.impl, case.grouped,
                   custom_pipeline_layers=case.custom)
    return CheckJob(hf_dir, str(out), case.layout, te_names=case.impl == "transformer_engine",
                    check_logits=True, grouped_gemm=case.grouped)


def expected_local_experts(layout: Layout, pp_rank: int, ep_rank: int, num_experts: int,
                           dense_layers: Collection[int] = ()) -> list[list[int]]:
    """Global expert indices megatron must place on a rank, per chunk: its EP share if the chunk
    holds a MoE layer, none if it holds dense layers (``dense_layers``) only."""
    per_rank = num_experts // layout.ep
    out = []
    for chunk in range(layout.vpp):
        vstage = layout.vstage(pp_rank, chunk)
        first = layout.layer_offset(vstage)
        layers = range(first, first + layout.layers_per_vstage[vstage])
        has_moe = any(layer not in dense_layers for layer in layers)
        out.append(list(range(ep_rank * per_rank, (ep_rank + 1) * per_rank)) if has_moe else [])
    return out


# A family round trip's layout: (TP, PP, custom pipeline layers, EP, ETP, grouped GEMM, transformer impl).
FamilyLayout = tuple


def layout_id(layout: FamilyLayout) -> str:
    tp, pp, custom, ep, etp, grouped, impl = layout
    return (f"tp{tp}pp{pp}{'-' + custom.replace(',', '_') if custom else ''}ep{ep}etp{etp or '=tp'}"
            f"{'-gg' if grouped else ''}-{'te' if impl == 'transformer_engine' else 'local'}")


def round_trip_layout(hf_dir: str, tmp_path: Path, layout: FamilyLayout) -> dict[str, dict]:
    """HF -> MCore at ``layout`` -> HF: the tensors and config.json must come back exactly; returns
    the rank files (relative directory -> loaded dict)."""
    from helpers import assert_same_tensors, hf_to_mcore, mcore_to_hf, rank_files

    tp, pp, custom, ep, etp, grouped, impl = layout
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert hf_to_mcore(hf_dir, mcore, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       custom_pipeline_layers=custom, expert_parallel_size=ep, expert_tensor_parallel_size=etp,
                       transformer_impl=impl, **{"moe-grouped-gemm": grouped}) == 0
    assert mcore_to_hf(mcore, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf_dir, "config.json")))
    return rank_files(mcore)
