"""Megatron-Core legacy per-rank checkpoints (``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``)."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
from dataclasses import dataclass, field

import torch

from .. import tensor_expr as te
from ..errors import ConversionError
from ..quant import te_pickle
from ..quant.te_pickle import Fp8BlockRecord
from ..tensor_expr import Expr, Leaf, TensorRef, source

TRACKER_NAME = "latest_checkpointed_iteration.txt"
FILE_NAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")

def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """Megatron's ``get_checkpoint_name`` rule: PPP only with PP > 1, EEE only with EP > 1."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def iteration_dir_name(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def load_file(path: str) -> dict:
    """Memory-mapped, weights-only load: tensors stay on disk until sliced. TE FP8 parameters
    come back as plain records (``quant/te_pickle``), without TE and without running code."""
    try:
        loaded = te_pickle.load(path)
    except Exception as e:  # torch raises many types for corrupt zips/pickles
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"cannot read Megatron checkpoint file {path}: {first}") from None
    for key, value in loaded.items():
        if isinstance(value, dict):
            for name, t in value.items():
                if isinstance(t, Fp8BlockRecord):
                    try:
                        t.check(f"{path}: {key}/{name}")
                    except ValueError as e:
                        raise ConversionError(str(e)) from None
    return loaded


@dataclass
class McoreSource:
    root: str  # the release/ or iter_XXXXXXX/ directory
    iteration: int | None
    files: dict[str, dict] = field(default_factory=dict)  # relpath -> loaded dict (mmap)

    def rank_dirs(self) -> list[str]:
        return sorted(os.path.dirname(f) for f in self.files)

    def containers(self, file: str) -> list[str]:
        return sorted(k for k, v in self.files[file].items() if re.fullmatch(r"model\d*", k) and isinstance(v, dict))

    def state_dict(self, file: str, container: str) -> dict:
        return self.files[file][container]

    def leaf(self, file: str, container: str, name: str) -> Expr:
        t = self.files[file][container][name]
        if isinstance(t, Fp8BlockRecord):  # codes and scale grid, read separately
            codes = source(TensorRef(file, name, container, "codes"), torch.float8_e4m3fn, t.shape)
            scale = source(TensorRef(file, name, container, "scale"), torch.float32, tuple(t.scale_inv.shape))
            return te.fp8_blocks(codes, scale)
        return source(TensorRef(file, name, container), t.dtype, tuple(t.shape))

    def fp8_records(self):
        for loaded in self.files.values():
            for value in loaded.values():
                if isinstance(value, dict):
                    yield from (t for t in value.values() if isinstance(t, Fp8BlockRecord))

    @property
    def has_fp8(self) -> bool:
        return next(self.fp8_records(), None) is not None

    @property
    def fp8_nominal_dtype(self) -> torch.dtype | None:
        first = next(self.fp8_records(), None)
        return first.nominal_dtype if first is not None else None

    def args(self) -> argparse.Namespace | None:
        for loaded in self.files.values():
            args = loaded.get("args")
            if isinstance(args, argparse.Namespace):
                return args
        return None

    def reader(self) -> "McoreReader":
        return McoreReader(self)


class McoreReader:
    """Reads leaf windows through its own memory maps, dropped on ``close``.

    Pages touched through a map count towards RSS until it is unmapped, so each output file
    gets fresh maps instead of reusing the planner's (which would grow to the whole model).
    """

    def __init__(self, src: McoreSource):
        self._src = src
        self._open: dict[str, dict] = {}

    def read_into(self, leaf: Leaf, out: torch.Tensor) -> None:
        file = leaf.ref.file
        if file not in self._open:
            self._open[file] = load_file(os.path.join(self._src.root, file))
        t = self._open[file][leaf.ref.container][leaf.ref.name]
        if leaf.ref.part is not None:
            t = t.codes if leaf.ref.part == "codes" else t.scale_inv
        for dim, (o, s) in enumerate(zip(leaf.offsets, leaf.shape)):
            t = t.narrow(dim, o, s)
        out.copy_(t)

    def close(self) -> None:
        self._open.clear()


def resolve_checkpoint_dir(path: str) -> tuple[str, int | None]:
    """Accept the root holding the tracker file, or a release/iter_ directory itself."""
    if not os.path.isdir(path):
        raise ConversionError(f"--load_ckpt_path {path} is not a directory")
    tracker = os.path.join(path, TRACKER_NAME)
    base = os.path.basename(os.path.normpath(path))
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if text == "release":
            return os.path.join(path, "release"), None
        if not text.isdigit():
            raise ConversionError(f"{tracker} holds {text!r}, expected 'release' or an iteration number")
        return os.path.join(path, iteration_dir_name(int(text))), int(text)
    if base == "release":
        return path, None
    m = re.fullmatch(r"iter_(\d{7})", base)
    if m:
        return path, int(m.group(1))
    if os.path.isdir(os.path.join(path, "release")):
        return os.path.join(path, "release"), None
    raise ConversionError(f"--load_ckpt_path {path}: no {TRACKER_NAME} and no release/ or iter_*/ directory")


def open_source(path: str) -> McoreSource:
    root, iteration = resolve_checkpoint_dir(path)
    if not os.path.isdir(root):
        raise ConversionError(f"Megatron checkpoint directory {root} does not exist")
    src = McoreSource(root, iteration)
    for name in sorted(os.listdir(root)):
        if not _RANK_DIR.match(name):
            continue
        file = os.path.join(name, FILE_NAME)
        full = os.path.join(root, file)
        if not os.path.isfile(full):
            raise ConversionError(f"rank directory {os.path.join(root, name)} has no {FILE_NAME}")
        src.files[file] = load_file(full)
    if not src.files:
        raise ConversionError(f"no mp_rank_*/{FILE_NAME} files in {root}")
    return src


def parse_rank_dir(name: str) -> tuple[int, int | None, int | None]:
    m = _RANK_DIR.match(name)
    if not m:
        raise ValueError(name)
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None), (int(m.group(3)) if m.group(3) else None)


def save_rank_file(path: str, containers: dict[str, dict], args: argparse.Namespace, iteration: int | None) -> None:
    payload: dict = dict(containers)
    payload["checkpoint_version"] = CHECKPOINT_VERSION
    payload["iteration"] = 0 if iteration is None else iteration
    payload["args"] = args
    with _without_zip_crc32():
        if any(isinstance(t, te_pickle.BlockwiseParam) for sd in containers.values() for t in sd.values()):
            te_pickle.save(payload, path)  # FP8 parameters pickled as TE tensors, without TE
        else:
            torch.save(payload, path)


@contextlib.contextmanager
def _without_zip_crc32():
    """torch.save spends ~30% of its time on zip CRC32s that torch.load never checks."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    set_ = getattr(torch.serialization, "set_crc32_options", None)
    if get is None or set_ is None:  # torch < 2.6
        yield
        return
    previous = get()
    set_(False)
    try:
        yield
    finally:
        set_(previous)
