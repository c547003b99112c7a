"""The endpoint protocol: one Source and/or one Target per on-disk checkpoint format.

Modelled on ``torch.distributed.checkpoint``'s StorageReader/StorageWriter split. A new format
is one module in this package that subclasses these and registers itself in
``endpoints/__init__.py``; the pipeline and the executor need no change.

A Source works in one of two namespaces:

* ``HFSource`` ("hf"): tensors under HuggingFace names. The pipeline maps them to the canonical
  form with the family's module convertors (``mapping.gather_hf``), or passes them through
  unchanged when the target is in the same namespace (HF -> HF).
* ``CanonicalSource`` ("canonical"): the format stores Megatron-Core names, sharded. The source
  reads its own layout off the files and gives back full canonical tensors.

Call order of a **Source** (all in the planning process, every rank the same)::

    src = SourceClass.open(path, model_request)   # lazy index: names, dtypes, shapes; no tensor data
    model = src.model()                           # family + architecture (+ HF config), or an error
    exprs = src.canonical(...) | pipeline mapping | src.native()   # expressions, no data read
    # then, in each worker process (forked), once per output file:
    reader = src.reader(); ...; reader.close()

Call order of a **Target**::

    tgt = TargetClass(request)                    # planning process; nothing touched on disk
    files = tgt.plan_files(...)                   # output files and each tensor's recipe
    tgt.check_plan(plan)                          # optional: last checks, notes (FP8 args ...)
    # executor: prepares the directory and the manifest, then in workers, any order, any rank:
    tgt.write_file(out, tmp_path, ctx)            # writes exactly one file at tmp_path
    # once, on rank 0, after every file is written and fsynced:
    tgt.finish(plan, results)                     # the ONLY place that writes config, index, markers

``finish`` writing last is what makes a directory with markers a complete checkpoint, and what
``--resume`` relies on: ``markers`` names the files it writes, removed before a resumed run.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar

from ..byteplan import buffered_bytes
from ..core.plan import ModelInfo, OutputFile, Plan
from ..dtypes import DType
from ..requests import LayoutRequest, ModelRequest
from ..tensor_expr import Expr, Leaf, LeafReader

if TYPE_CHECKING:

    from ..core.canonical import CanonicalTensor
    from ..layout.placement import ParallelLayout
    from ..materialize import FileContext
    from ..report import FileResult


class Source(ABC):
    """A checkpoint to read (see the module docstring for the call order)."""

    format: str  # the registered name (--load_platform)
    short: str  # in the plan's direction string: "hf", "mcore"
    root: str  # the directory the tensors are read from

    @abstractmethod
    def model(self) -> ModelInfo:
        """The model's family and architecture, from the checkpoint and the model request."""

    @property
    @abstractmethod
    def tensor_count(self) -> int:
        """Tensors stored in the checkpoint (for the coverage report)."""

    @property
    def has_fp8(self) -> bool:
        """Whether the checkpoint stores block-FP8 weights."""
        return False

    @property
    def fp8_nominal_dtype(self) -> DType | None:
        """The dtype its FP8 parameters present as, where the format records one."""
        return None

    @abstractmethod
    def reader(self) -> LeafReader:
        """A reader of leaf windows, one per output file (called in the worker)."""

    def bytes_read_for(self, leaves: Iterable[Leaf]) -> int:
        """Source bytes read to build one output file from these leaves."""
        from ..tensor_expr import nbytes

        return sum(nbytes(leaf) for leaf in leaves)

    @property
    def largest_group_bytes(self) -> int:
        """Memory a reader holds besides the output file (converted tensor groups)."""
        return 0

    def in_file(self, leaf: Leaf) -> bool:
        """Whether the leaf's whole tensor lies plainly in a file (contiguous, uncompressed, its
        dtype as stored), so that its reader's ``locate`` finds it and windows of it are moved
        without a buffer. Decided at plan time; False unless the format knows."""
        return False

    def describe(self) -> list[str]:
        """Extra ``--dry_run`` lines about the source."""
        return []


class HFSource(Source):
    """A source under HuggingFace tensor names."""

    if TYPE_CHECKING:  # declared read-only, so that a subclass may give it as a property or an attribute
        @property
        def index(self) -> Mapping[str, str]:
            """Tensor name -> file, every tensor stored."""

    @abstractmethod
    def leaf(self, name: str) -> Expr:
        """The stored tensor as an expression (an FP8 weight comes with its block scales)."""

    def companions(self, name: str) -> list[str]:
        """Tensors read together with ``name`` (e.g. an FP8 weight's scales)."""
        return []

    @abstractmethod
    def native(self) -> dict[str, list[tuple[str, Expr]]]:
        """Every tensor as stored, grouped by the file it should go to when the target keeps
        the source's sharding (HF -> HF): file -> [(name, expression)], in order."""

    @property
    def hf_config(self) -> dict:
        """config.json (as the converters leave it, when there are converters)."""
        return {}


class CanonicalSource(Source):
    """A source in Megatron-Core names: its layout is read off its files."""

    @abstractmethod
    def canonical(self, tensors: list[CanonicalTensor], model: ModelInfo,
                  flags: LayoutRequest) -> tuple[dict[str, Expr], ParallelLayout]:
        """Full canonical expressions of ``tensors`` and the layout the files hold. Layout
        flags that were given must agree with the files."""


class Target(ABC):
    """A checkpoint to write (see the module docstring for the call order)."""

    format: ClassVar[str]
    short: ClassVar[str]
    file_kind: ClassVar[str]  # OutputFile.fmt of its files
    markers: ClassVar[tuple[str, ...]] = ()  # top-level files written by finish()

    def __init__(self, target_dir: str):
        self.target_dir = target_dir

    @property
    def data_dir(self) -> str:
        """Where the planned files' relative paths start."""
        return self.target_dir

    def check_plan(self, plan: Plan) -> None:  # noqa: B027  (an optional hook, not abstract)
        """Called once the plan is complete: last checks, notes."""

    def fingerprint_fields(self) -> dict:
        """What besides the files decides the output bytes (hashed into the resume fingerprint)."""
        return {"args": None, "hf_config": None}

    def describe(self, plan: Plan) -> list[str]:
        """Extra ``--dry_run`` lines (e.g. the placement table)."""
        return []

    def memory_bytes(self, out: OutputFile, source: Source) -> int:
        """Bytes a worker holds while writing ``out`` (the memory budget admits files by it): the
        whole file by default; a target that streams small independent pieces says less."""
        return out.nbytes

    @abstractmethod
    def write_file(self, out: OutputFile, path: str, ctx: FileContext) -> str | None:
        """Write one planned file at ``path`` (a temporary name the executor renames). Returns
        the file's sha256 where the target hashed it while finishing it, else None (the
        executor then reads it back to hash it)."""

    @abstractmethod
    def finish(self, plan: Plan, results: list[FileResult]) -> None:
        """After every file: config, index, tracker and other markers."""


class HFTarget(Target):
    """A target under HuggingFace tensor names."""

    # HF -> HF without a --converter would be a plain copy; a target that transforms the tensors
    # itself (KTransformers' experts) takes an HF source as it is.
    needs_converter: ClassVar[bool] = True

    notes: list[str]  # plan notes from use_model_config
    config: dict | None  # config.json to write, as planned (None: a reference directory's)
    # Set when converters run after the model mapping: config.json -> what they make of it.
    post_stage_config: Callable[[dict], dict] | None

    @abstractmethod
    def use_model_config(self, model: ModelInfo) -> None:
        """The config.json to write for ``model`` (a conversion through a model; before ``plan_files``)."""

    @abstractmethod
    def plan_files(self, exprs: Mapping[str, Expr], fp8_names: set[str]) -> list[OutputFile]:
        """Shard HF-named tensors into files; ``fp8_names`` are written as block FP8."""

    @abstractmethod
    def plan_files_like(self, source: HFSource, notes: list[str]) -> list[OutputFile]:
        """Keep the source's own files and names (HF -> HF through converters)."""

    @abstractmethod
    def plan_shards(self, shards: Mapping[str, list[tuple[str, Expr]]], notes: list[str]) -> list[OutputFile]:
        """Files as given: shard name -> its tensors in order (converter outputs in their home shard)."""


class CanonicalTarget(Target):
    """A target in Megatron-Core names, sharded by a layout it builds from the flags."""

    @abstractmethod
    def plan_files(self, exprs: Mapping[str, Expr], tensors: list[CanonicalTensor], model: ModelInfo,
                   fp8_output: bool) -> list[OutputFile]:
        """Shard canonical tensors into the layout's files."""

    @property
    @abstractmethod
    def layout(self) -> ParallelLayout:
        """The layout planned by ``plan_files``."""


def in_place_memory(out: OutputFile, source: Source) -> int:
    """What a file written in place (``endpoints/file_writers``) holds: the tensors it computes
    (counted as if all were held at once; the worker's buffer holds one at a time), none for the
    tensors that only move bytes of the source's files."""
    return sum(buffered_bytes(job.expr, source.in_file) for job in out.tensor_jobs() if job.expr is not None)


__all__ = ["CanonicalSource", "CanonicalTarget", "HFSource", "HFTarget", "ModelRequest", "Source", "Target",
           "in_place_memory"]
