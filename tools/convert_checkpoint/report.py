"""What a finished conversion says about itself: ``conversion_report.json`` and the summary
lines printed at the end (FP8 decisions, NaN/Inf warnings)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, is_dataclass
from typing import TYPE_CHECKING

from . import tensor_expr as tx
from ._version import __version__
from .quant.fp8_materialize import Fp8Event

if TYPE_CHECKING:
    from .core.plan import Plan

REPORT_NAME = "conversion_report.json"


@dataclass(frozen=True)
class FileResult:
    relpath: str
    nbytes: int
    seconds: float
    fp8_events: tuple[Fp8Event, ...] = ()
    file_bytes: int = 0
    sha256: str = ""
    reused: bool = False  # finished by an earlier run and verified (--resume)
    nonfinite: tuple[tuple[str, int], ...] = ()  # (tensor, NaN/Inf count): warnings


def _peak_rss_bytes() -> int:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) * scale


def conversion_report(plan: Plan, results: list[FileResult], seconds: float) -> dict:
    """What ``conversion_report.json`` holds: the flags, every file, speed, memory, what FP8
    tensors went through, and the coverage the plan validated."""
    events = [e for r in results for e in r.fp8_events]
    total = sum(r.nbytes for r in results if not r.reused)
    options = {k: (list(v) if isinstance(v, tuple) else vars(v) if is_dataclass(v) else v)
               for k, v in vars(plan.options).items()} if plan.options else None
    return {
        "tool": "convert_checkpoint",
        "version": __version__,
        "direction": plan.direction,
        "source": os.path.abspath(plan.source_dir),
        "target": os.path.abspath(plan.target_dir),
        "options": options,
        "files": [{"path": r.relpath, "bytes": r.file_bytes, "sha256": r.sha256, "seconds": round(r.seconds, 3),
                   **({"reused": True} if r.reused else {})} for r in sorted(results, key=lambda r: r.relpath)],
        "total_bytes": total,
        "seconds": round(seconds, 3),
        "gb_per_s": round(total / 1e9 / seconds, 3) if seconds > 0 else None,
        "peak_rss_bytes": _peak_rss_bytes(),
        "coverage": {
            # Validated before anything was written: every source tensor consumed or in the
            # family's ignore list, every target tensor produced from a recipe.
            "source_tensors": plan.source_tensor_count,
            "target_tensors": sum(f.tensor_count for f in plan.files),
            "all_source_tensors_consumed_or_ignored": True,
            "all_target_tensors_produced": True,
        },
        "fp8": None if plan.fp8 is None else {
            "force_pow_2_scales": plan.fp8.recipe.pow2,
            "amax_epsilon": plan.fp8.recipe.amax_epsilon,
            "quant_method": plan.fp8.recipe.method,
            "device": plan.fp8.recipe.device,
            "kept": sum(1 for e in events if e.action == "kept"),
            "requantized": [{"tensor": e.tensor, "reason": e.reason} for e in events if e.action == "requantized"],
            "quantized": [{"tensor": e.tensor, "reason": e.reason} for e in events if e.action == "quantized"],
        },
        "cast": cast_tensors(plan),
        "nonfinite": [{"file": r.relpath, "tensor": name, "count": n} for r in results for name, n in r.nonfinite],
        "notes": plan.notes,
    }


def cast_tensors(plan: Plan) -> list[dict]:
    """Output tensors whose recipe changes a dtype (e.g. a bf16 router bias widened to fp32)."""
    out = []
    for f, _, j in plan.jobs():
        for node in tx.casts(j.expr) if j.expr is not None else ():
            out.append({"file": f.relpath, "tensor": j.name, "from": tx.dtype_name(node.part.dtype),
                        "to": tx.dtype_name(node.dtype)})
    return out



def value_warnings(results: list[FileResult], limit: int = 10) -> list[str]:
    found = [(r.relpath, name, n) for r in results for name, n in r.nonfinite]
    if not found:
        return []
    lines = [f"warning: {len(found)} tensors hold NaN/Inf values, as in the source (--strict_values makes this an error):"]
    lines += [f"  {name} in {file}: {n}" for file, name, n in found[:limit]]
    if len(found) > limit:
        lines.append(f"  ... and {len(found) - limit} more (all in conversion_report.json)")
    return lines


def fp8_summary(results: list[FileResult], limit: int = 10) -> list[str]:
    """Human lines: how many FP8 tensors were kept, requantized (and why) or quantized."""
    events = [e for r in results for e in r.fp8_events]
    if not events:
        return []
    counts = {a: sum(1 for e in events if e.action == a) for a in ("kept", "requantized", "quantized")}
    lines = [f"FP8: {counts['kept']} tensors kept bit for bit, {counts['requantized']} requantized, "
             f"{counts['quantized']} quantized from bf16"]
    changed = [e for e in events if e.action != "kept"]
    lines += [f"  {e.action} {e.tensor}: {e.reason}" for e in changed[:limit]]
    if len(changed) > limit:
        lines.append(f"  ... and {len(changed) - limit} more")
    return lines
