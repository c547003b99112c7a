"""What a conversion will write: output files, and in each the recipe of every tensor.

Built by ``pipeline.build_plan``, carried out by ``execute``; the ``target`` endpoint that
planned the files writes them and the metadata around them.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import tensor_expr as tx
from ..tensor_expr import Expr

if TYPE_CHECKING:  # types only: the endpoints import this module
    from ..config.arch import ModelArch
    from ..config.family import FamilySpec
    from ..endpoints.base import Source, Target
    from ..layout.placement import ParallelLayout
    from ..quant.fp8_materialize import Fp8Policy


@dataclass(frozen=True)
class TensorJob:
    name: str
    expr: Expr | None  # None: an ``_extra_state`` entry, saved as None like Megatron's own


@dataclass(frozen=True)
class OutputFile:
    relpath: str
    fmt: str  # the target's file kind ("mcore", "safetensors"): part of the resume fingerprint
    containers: tuple[tuple[str, tuple[TensorJob, ...]], ...]  # ("" for formats without containers)

    def jobs(self) -> Iterator[tuple[str, TensorJob]]:
        """(container, job) for every entry, ``_extra_state`` placeholders included."""
        for key, jobs in self.containers:
            for job in jobs:
                yield key, job

    def tensor_jobs(self) -> Iterator[TensorJob]:
        """The jobs that write a tensor (not ``_extra_state`` placeholders)."""
        return (j for _, j in self.jobs() if j.expr is not None)

    def tensor_exprs(self) -> Iterator[Expr]:
        """The expressions of :meth:`tensor_jobs`."""
        return (j.expr for _, j in self.jobs() if j.expr is not None)

    @property
    def nbytes(self) -> int:
        return sum(tx.nbytes(e) for e in self.tensor_exprs())

    @property
    def tensor_count(self) -> int:
        return sum(1 for _ in self.tensor_jobs())


@dataclass(frozen=True)
class ModelInfo:
    """The model a conversion moves: its family (YAML), architecture, and the HF config.json it
    came with (None when unknown)."""

    family: FamilySpec
    arch: ModelArch
    hf_config: dict | None = None
    # HF tensors whose dtype the Megatron side changes (e.g. a bf16 router bias kept in fp32):
    # name -> the source dtype name, restored on the way back to HF.
    hf_dtypes: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    direction: str  # "hf->mcore", "mcore->hf", "mcore->mcore" or "hf->hf" (kept for resume fingerprints)
    source_dir: str
    target_dir: str
    files: list[OutputFile]
    source_tensor_count: int
    source: Source
    target: Target
    model: ModelInfo | None = None  # None: HF -> HF through converters, no model involved
    layout: ParallelLayout | None = None  # the Megatron layout of whichever side has one
    notes: list[str] = field(default_factory=list)
    fp8: Fp8Policy | None = None  # set when some output tensor is block FP8
    options: Any = None  # the flags (ConvertOptions), recorded in the report and the fingerprint
    _memory: dict[str, int] = field(default_factory=dict, repr=False, compare=False)  # memory_bytes per file

    @property
    def arch(self) -> ModelArch | None:
        return self.model.arch if self.model else None

    @property
    def family(self) -> FamilySpec | None:
        return self.model.family if self.model else None

    def jobs(self) -> Iterator[tuple[OutputFile, str, TensorJob]]:
        """(file, container, job) for every entry of every output file."""
        for f in self.files:
            for key, job in f.jobs():
                yield f, key, job

    def fp8_jobs(self) -> list[tuple[str, Expr]]:
        """(output tensor, FP8 expression) for every block-FP8 tensor written."""
        out: list[tuple[str, Expr]] = []
        for _, _, j in self.jobs():
            if isinstance(j.expr, (tx.Fp8Blocks, tx.Quantize)):
                out.append((j.name, j.expr))
            elif isinstance(j.expr, tx.Fp8Part) and j.expr.which == "codes":
                out.append((j.name, j.expr.of))
        return out

    def memory_bytes(self, out: OutputFile) -> int:
        """Bytes a worker holds while it writes ``out`` (the target's estimate, for the memory
        budget); computed once per file (it walks the file's expressions)."""
        held = self._memory.get(out.relpath)
        if held is None:
            held = self._memory[out.relpath] = self.target.memory_bytes(out, self.source)
        return held

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)
