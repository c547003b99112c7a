"""The conversion manifest: what a run has finished, so that ``--resume`` redoes only the rest.

``conversion_manifest.json`` in the output directory holds the plan's fingerprint (tool version,
direction, the flags that shape the output, the source index and every tensor's recipe) and,
per output file, its size, sha256 and whether it is done. It is rewritten atomically after each
file. A resumed run must have the same fingerprint; it keeps a done file only when its size and
sha256 still match, and rebuilds everything else.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import tensor_expr as tx
from ._version import __version__
from .errors import ConversionError
from .textfile import write_text

if TYPE_CHECKING:
    from .core.plan import OutputFile, Plan

MANIFEST_STEM = "conversion_manifest"
MANIFEST_NAME = MANIFEST_STEM + ".json"


def rank_manifest_name(rank: int) -> str:
    return f"{MANIFEST_STEM}.rank{rank}.json"
# Flags that change how a conversion runs, not what it writes.
_RUNTIME_OPTIONS = {"max_workers", "max_memory", "world_size", "rank", "overwrite", "dry_run", "verbose", "progress",
                    "resume", "save_ckpt_path", "strict_values",
                    # checks against the model: they only ever stop a run
                    "check_num_experts", "check_vocab_size", "check_torch_dtype",
                    # the kt_cpu target's settings: hashed by that target (fingerprint_fields), so
                    # other conversions keep their earlier fingerprints
                    "kt"}


@dataclass
class FileRecord:
    planned_bytes: int
    done: bool = False
    bytes: int | None = None
    sha256: str | None = None
    fp8_events: list = field(default_factory=list)  # [tensor, action, reason, pow2] of the run that wrote it


# Options newer than the fingerprint's form, left out at their defaults so older runs still resume
# (vision-language flags). --enable-full-hetero-dp never changes the bytes: it is refused where it would.
_LATER_OPTIONS: dict[str, Any] = {"encoder_tensor_model_parallel_size": None, "vision_patch_convert_file": None}
_RUNTIME_OPTIONS = _RUNTIME_OPTIONS | {"enable_full_hetero_dp"}


def plan_fingerprint(plan: Plan) -> str:
    """sha256 over everything that decides the output bytes. Its inputs keep their historical
    form (direction string, file kinds, Megatron args, config.json) so that ``--resume`` of a run
    started by an earlier build of the same version still matches."""
    options: dict[str, Any] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(plan.options).items()
               if k not in _RUNTIME_OPTIONS and not (k in _LATER_OPTIONS and v == _LATER_OPTIONS[k])} if plan.options else {}
    options["load_ckpt_path"] = os.path.abspath(options.get("load_ckpt_path", plan.source_dir))
    h = hashlib.sha256()
    head = {"version": __version__, "direction": plan.direction, "options": options,
            "fp8": None if plan.fp8 is None else repr(plan.fp8), **plan.target.fingerprint_fields()}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for f in plan.files:
        h.update(f"\nfile {f.relpath} {f.fmt}".encode())
        for key, j in f.jobs():
            recipe = "None" if j.expr is None else f"{j.expr.dtype} {list(j.expr.shape)} {tx.describe(j.expr)}"
            h.update(f"\n{key}/{j.name}: {recipe}".encode())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


class Manifest:
    # Rewriting the whole manifest after every file is quadratic in the file count (KTransformers'
    # raw mode writes ~180,000 files for DeepSeek-V3): a larger manifest is saved at most every
    # SAVE_SECONDS, and at the end. A file finished but not yet recorded is rebuilt on --resume.
    SAVE_EACH_UP_TO = 64
    SAVE_SECONDS = 2.0

    def __init__(self, path: str, fingerprint: str, files: dict[str, FileRecord]):
        self.path = path
        self.fingerprint = fingerprint
        self.files = files
        self._saved_at = 0.0

    @classmethod
    def fresh(cls, target: str, files: list[OutputFile], fingerprint: str, name: str = MANIFEST_NAME) -> Manifest:
        """A manifest of ``files`` (OutputFile), none done; a rank of a multi-process run keeps
        its own (``name``), merged by rank 0 at the end."""
        return cls(os.path.join(target, name), fingerprint, {f.relpath: FileRecord(f.nbytes) for f in files})

    @classmethod
    def for_resume(cls, target: str, files: list[OutputFile], fingerprint: str, root: str, name: str = MANIFEST_NAME) -> Manifest:
        """The earlier runs' records for ``files``, each done file checked on disk (size and
        sha256); refuses a directory written by another plan."""
        paths = sorted(os.path.join(target, n) for n in os.listdir(target) if n.startswith(MANIFEST_STEM)
                       and n.endswith(".json")) if os.path.isdir(target) else []
        if not paths:
            raise ConversionError(f"--resume: {target} has no {MANIFEST_NAME}; nothing to resume (drop --resume, "
                                  "and pass --overwrite to replace the directory)")
        previous: dict[str, FileRecord] = {}
        for path in paths:
            try:
                with open(path) as f:
                    data = json.load(f)
                records = {k: FileRecord(**v) for k, v in data["files"].items()}
            except (ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"--resume: unreadable {path} ({e}); pass --overwrite to start over") from None
            if data.get("fingerprint") != fingerprint:
                raise ConversionError(
                    f"--resume: {target} was written by a different plan (other source, flags or tool version); "
                    "refusing to mix them. Re-run with the original flags, or pass --overwrite to start over"
                )
            previous.update({k: v for k, v in records.items() if v.done or k not in previous})
        manifest = cls.fresh(target, files, fingerprint, name)
        for relpath, record in previous.items():
            full = os.path.join(root, relpath)
            if (record.done and relpath in manifest.files and os.path.isfile(full)
                    and os.path.getsize(full) == record.bytes and file_sha256(full) == record.sha256):
                manifest.files[relpath] = record
        return manifest

    @property
    def done(self) -> set[str]:
        return {k for k, v in self.files.items() if v.done}

    def mark_done(self, relpath: str, nbytes: int, sha256: str, fp8_events: list) -> None:
        record = self.files[relpath]
        record.done, record.bytes, record.sha256, record.fp8_events = True, nbytes, sha256, fp8_events
        if len(self.files) <= self.SAVE_EACH_UP_TO or time.monotonic() - self._saved_at >= self.SAVE_SECONDS:
            self.save()

    def save(self) -> None:
        data = {"fingerprint": self.fingerprint, "files": {k: vars(v) for k, v in self.files.items()}}
        write_text(self.path, json.dumps(data, indent=1), tmp=self.path + ".tmp")
        self._saved_at = time.monotonic()
