"""The ``--dry_run`` placement table: which decoder layers, experts and MTP layers land in which
rank files (pipeline stage x virtual chunk x expert rank; TP ranks share a row)."""
from __future__ import annotations

from ..config.arch import ModelArch
from .placement import ParallelLayout


def _span(first: int, count: int) -> str:
    if count <= 0:
        return "-"
    return str(first) if count == 1 else f"{first}-{first + count - 1}"


def placement_table(layout: ParallelLayout, arch: ModelArch) -> list[str]:
    pipe = layout.pipeline
    files = layout.expert_files()
    ep_ranks = sorted({e for _, e in files})
    per_rank = (arch.num_experts or 0) // layout.ep if layout.ep else 0
    mtp = layout.mtp_num_layers
    header = ["stage", "chunk", "EP rank", "TP ranks", "decoder layers"] + (["experts"] if arch.num_experts else []) \
        + (["MTP layers"] if mtp else [])
    rows = []
    for stage in range(pipe.pp):
        for chunk in range(pipe.vpp):
            v = pipe.vstage(stage, chunk)
            first, count = pipe.first_layer(v), pipe.layers_per_vstage[v]
            last = v == pipe.last_vstage
            moe_here = any(arch.is_moe_layer(layer) for layer in range(first, first + count)) or (last and mtp > 0)
            for ep in ep_ranks:
                tps = sorted(t for t, e in files if e == ep)
                row = [str(stage), str(chunk), str(ep), _span(tps[0], len(tps)) if tps == list(range(tps[0], tps[0] + len(tps)))
                       else ",".join(map(str, tps)), _span(first, count)]
                if arch.num_experts:
                    row.append(_span(ep * per_rank, per_rank) if moe_here else "-")
                if mtp:
                    row.append(_span(0, mtp) if last else "-")
                rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    lines = ["placement (one file per TP rank in each row; layer and expert numbers are global):",
             fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in rows]
    if layout.encoder_tp is not None:
        lines.append(f"  vision tower and merger (encoder_model.*): stage 0, chunk 0, encoder TP {layout.encoder_tp} "
                     f"(file t holds encoder shard t mod {layout.encoder_tp}); language model under foundation_model.")
    return lines
