"""The human summary of a plan (``--dry_run``, and the header of every run)."""
from __future__ import annotations

from . import tensor_expr as tx
from .core.plan import Plan

FILES_LISTED = 200  # beyond this (e.g. KTransformers' raw .kt files), a count


def bytes_to_read(plan: Plan) -> int:
    """Source bytes the recipes read (a window read by several files counts each time; the
    tensors a target encodes from one part, e.g. a weight and its scales, read it once)."""
    return sum(plan.source.bytes_read_for([leaf for e in _read_exprs(f.tensor_exprs()) for leaf in tx.leaves(e)])
               for f in plan.files)


def _read_exprs(found) -> list[tx.Expr]:
    exprs = list(found)
    parts = dict.fromkeys(e.part for e in exprs if isinstance(e, tx.Encode))
    return [*parts, *(e for e in exprs if not isinstance(e, tx.Encode))]


def predicted_memory(plan: Plan, max_workers: int) -> str:
    """Each worker holds what the target says one file needs (``Plan.memory_bytes``: for files
    written in place, the tensors that compute; moved bytes are not buffered), plus, behind
    converters, one tensor group in and out."""
    largest = max((plan.memory_bytes(f) for f in plan.files), default=0)
    group = plan.source.largest_group_bytes
    workers = min(max_workers, max(len(plan.files), 1))
    held = f"{largest / 1e9:.3f} GB held for the largest file" + (f", and converter group, {group / 1e9:.3f} GB" if group else "")
    return (f"predicted peak memory: about {(workers * (largest + group) + 2**30) / 2**30:.2f} GiB "
            f"({workers} worker{'s' if workers > 1 else ''} x {held}, + ~1 GiB)")


def describe_plan(plan: Plan, max_workers: int = 1, verbose: bool = False) -> str:
    lines = _header(plan) + [
        f"source: {plan.source_dir} ({plan.source_tensor_count} tensors)",
        f"target: {plan.target_dir} ({len(plan.files)} files, {plan.total_bytes / 1e9:.3f} GB to write, "
        f"{bytes_to_read(plan) / 1e9:.3f} GB to read)",
        predicted_memory(plan, max_workers),
    ]
    lines += plan.target.describe(plan)
    listed = plan.files if verbose else plan.files[:FILES_LISTED]
    for f in listed:
        lines.append(f"  {f.relpath}: {f.tensor_count} tensors, {f.nbytes / 1e6:.1f} MB")
        if verbose:
            for key, j in f.jobs():
                where = f"{key}/{j.name}" if key else j.name
                recipe = ("None (_extra_state)" if j.expr is None
                          else f"{list(j.expr.shape)} {tx.dtype_name(j.expr.dtype)} <- {tx.describe(j.expr)}")
                lines.append(f"    {where}: {recipe}")
    if len(listed) < len(plan.files):
        lines.append(f"  ... and {len(plan.files) - len(listed)} more files (--dry_run --verbose lists them all)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _header(plan: Plan) -> list[str]:
    arch, family, lay = plan.arch, plan.family, plan.layout
    if arch is None or family is None or lay is None:  # HF -> HF through converters: no model, no layout
        return [f"plan: {plan.direction}  " + "  ".join(plan.source.describe())]
    pipe = lay.pipeline
    return [
        f"plan: {plan.direction}  family={family.name}  layers={arch.num_layers}  "
        f"TP={lay.tp} PP={pipe.pp} VPP={pipe.vpp} layers/stage={','.join(map(str, pipe.layers_per_vstage))}  "
        f"impl={lay.transformer_impl}  vocab={arch.vocab_size} padded={lay.padded_vocab_size}  "
        f"tied={arch.tied_embeddings}"
        + (f"  experts={arch.num_experts} EP={lay.ep} ETP={lay.expert_tp} grouped={lay.grouped_gemm}"
           if arch.num_experts else "")
        + (f"  MTP={arch.mtp_num_layers} ({lay.mtp_inner_name})" if arch.mtp_num_layers else ""),
    ]
