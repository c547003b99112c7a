"""``convert-checkpoint verify A B``: are two checkpoints the same model?

Each side (any format a source endpoint reads, any layout) is opened as a Source and mapped to
the canonical form (full tensors, Megatron names, global layer and expert indices) by the same
pipeline a conversion uses, and the tensors are compared one at a time in fp32 (block FP8
dequantized), so memory stays at two tensors. Differences are summarised per tensor class
(layer and expert numbers folded); missing and extra tensors are listed. Exit code 0 when every
tensor matches within ``--atol``, 1 on any difference, 2 on unusable input.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from .torch_import import torch

from . import dtypes
from . import tensor_expr as te
from .endpoints import detect
from .endpoints.base import Source
from .errors import ConversionError
from .execute import progress_bar
from .pipeline import canonical_view, open_source
from .requests import PlanRequest, TargetDir
from .tensor_expr import Expr


@dataclass
class CanonicalSide:
    path: str
    kind: str  # the format name ("huggingface", "mcore")
    family: str
    exprs: dict[str, Expr]
    source: Source  # gives the reader


def load_canonical(path: str) -> CanonicalSide:
    """The canonical expressions of a checkpoint directory (format detected)."""
    if not os.path.isdir(path):
        raise ConversionError(f"verify: {path} is not a directory")
    kind = detect(path)
    source = open_source(PlanRequest(kind, kind, path, TargetDir("")))
    model, exprs = canonical_view(source)
    return CanonicalSide(path, kind, model.family.name, exprs, source)


def tensor_class(name: str) -> str:
    """``decoder.layers.7.mlp.experts.local_experts.3.linear_fc1.weight`` ->
    ``decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight``."""
    return re.sub(r"\.\d+\.", ".*.", name)


@dataclass
class ClassStats:
    tensors: int = 0
    differing: int = 0
    max_abs_diff: float = 0.0
    dtypes: set[str] = field(default_factory=set)


@dataclass
class Report:
    only_a: list[str]
    only_b: list[str]
    classes: dict[str, ClassStats]
    shape_mismatches: list[str]

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.shape_mismatches
                    or any(c.differing for c in self.classes.values()))


def _values(expr: Expr, reader) -> torch.Tensor:
    return te.materialize(te.cast(expr, dtypes.FLOAT32), reader)


def compare(a: CanonicalSide, b: CanonicalSide, atol: float = 0.0, progress: bool = False) -> Report:
    names_a, names_b = set(a.exprs), set(b.exprs)
    report = Report(sorted(names_a - names_b), sorted(names_b - names_a), {}, [])
    reader_a, reader_b = a.source.reader(), b.source.reader()
    common = sorted(names_a & names_b)
    bar = progress_bar(sum(te.nbytes(a.exprs[n]) for n in common), progress, "verify")
    try:
        for name in common:
            ea, eb = a.exprs[name], b.exprs[name]
            stats = report.classes.setdefault(tensor_class(name), ClassStats())
            stats.tensors += 1
            stats.dtypes.add(" vs ".join(sorted({te.dtype_name(ea.dtype), te.dtype_name(eb.dtype)})))
            if tuple(ea.shape) != tuple(eb.shape):
                report.shape_mismatches.append(f"{name}: {list(ea.shape)} vs {list(eb.shape)}")
                continue
            va, vb = _values(ea, reader_a), _values(eb, reader_b)
            same_nan = torch.isnan(va) == torch.isnan(vb)
            diff = torch.where(torch.isnan(va) & torch.isnan(vb), 0.0, (va - vb).abs())
            worst = float(diff.max()) if diff.numel() else 0.0
            if not bool(same_nan.all()):
                worst = float("nan")
            if not worst <= atol:  # NaN counts as a difference
                stats.differing += 1
            if worst != worst or worst > stats.max_abs_diff:
                stats.max_abs_diff = worst
            if bar:
                bar.update(te.nbytes(ea))
    finally:
        reader_a.close()
        reader_b.close()
        if bar:
            bar.close()
    return report


def format_report(a: CanonicalSide, b: CanonicalSide, report: Report, limit: int = 20) -> list[str]:
    lines = [f"A: {a.path} ({a.kind}, {a.family}, {len(a.exprs)} canonical tensors)",
             f"B: {b.path} ({b.kind}, {b.family}, {len(b.exprs)} canonical tensors)"]
    width = max((len(c) for c in report.classes), default=10)
    lines.append(f"  {'tensor class':<{width}}  tensors  differing  max |diff|  dtypes")
    for cls in sorted(report.classes):
        s = report.classes[cls]
        lines.append(f"  {cls:<{width}}  {s.tensors:7d}  {s.differing:9d}  {s.max_abs_diff:10.3g}  {', '.join(sorted(s.dtypes))}")
    for what, names in (("only in A", report.only_a), ("only in B", report.only_b),
                        ("shape differs", report.shape_mismatches)):
        lines += [f"{what}: {n}" for n in names[:limit]]
        if len(names) > limit:
            lines.append(f"{what}: ... and {len(names) - limit} more")
    lines.append("identical" if report.identical else "DIFFERENT")
    return lines


def main(argv: list[str]) -> int:
    from .options import one_line_parser

    p = one_line_parser("convert-checkpoint verify",
                        "Compare two checkpoints (HF or Megatron-Core, any layout) tensor by tensor.")
    p.add_argument("a", help="checkpoint directory")
    p.add_argument("b", help="checkpoint directory")
    p.add_argument("--atol", type=float, default=0.0, help="largest |difference| still counted as equal (default 0: exact)")
    p.add_argument("--no_progress", "--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    try:
        a, b = load_canonical(args.a), load_canonical(args.b)
        if a.family != b.family:
            raise ConversionError(f"verify: {args.a} is a {a.family} model and {args.b} a {b.family} model")
        report = compare(a, b, args.atol, progress=not args.no_progress)
    except ConversionError as e:
        print(f"convert-checkpoint verify: error: {e}", file=sys.stderr)
        return e.exit_code
    print("\n".join(format_report(a, b, report)))
    return 0 if report.identical else 1
