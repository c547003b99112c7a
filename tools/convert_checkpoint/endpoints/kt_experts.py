"""Routed experts found in HF tensor names, for the KTransformers target and ``verify-kt``.

Three namings are recognized: ``mlp.experts.N.{gate,up,down}_proj.weight`` (DeepSeek, Qwen),
MiniMax/Mixtral ``block_sparse_moe.experts.N.{w1,w3,w2}.weight``, and fused 3-D
``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` / ``mlp.experts.down_proj`` ``[E, I, H]`` (kt-kernel's
orientation; ``[E, 2I, H]`` / ``[E, H, I]`` when only that fits the config). Each projection is
given as an expression in its stored orientation plus whether that is transposed from HF's
``[out, in]``. Everything is checked against config.json before a byte is written.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
else:
    pass

from .. import dtypes
from .. import tensor_expr as tx
from ..errors import ConversionError
from ..tensor_expr import Expr

PROJECTIONS = ("gate", "up", "down")
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(?:\.weight)?")
_EXPERT_SPACE = re.compile(r".*\.(?:mlp|block_sparse_moe)\.experts\..*")
_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
FP8_SCALE = "_scale_inv"


@dataclass(frozen=True)
class MoeShape:
    """What config.json says (``text_config`` when present), kt-kernel's fields."""

    num_experts: int
    hidden: int
    intermediate: int  # of one expert
    num_layers: int | None  # layers from here on (MTP) keep no experts


@dataclass(frozen=True)
class Projection:
    expr: Expr  # 2-D, or 3-D with a leading 1 (one expert of a fused tensor)
    transposed: bool  # stored as [in, out]
    source: str  # the tensor it comes from (messages)

    def hf_dim(self, hf: int) -> int:
        """The stored dimension of HF dimension ``hf`` (0 = out, 1 = in)."""
        stored = 1 - hf if self.transposed else hf
        return stored + len(self.expr.shape) - 2


@dataclass
class ExpertLayers:
    layers: dict[int, dict[tuple[int, str], Projection]] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)  # non-expert tensors, as named in the source
    dropped_mtp: list[str] = field(default_factory=list)  # expert tensors of layers >= num_layers
    renamed: dict[str, str] = field(default_factory=dict)  # name without language_model. -> source name


def strip_language_model(name: str) -> str:
    """kt-kernel reads VL checkpoints' text weights under their names without ``language_model.``."""
    return name.replace("language_model.", "") if "language_model" in name else name


def output_name(name: str) -> str:
    """kt-kernel's name for a copied non-expert tensor: ``model.layers.`` -> ``blk.``, then every
    other ``model.`` removed (names not starting with ``model.`` are kept)."""
    if not name.startswith("model."):
        return name
    return name.replace("model.layers.", "blk.").replace("model.", "")


def moe_shape(config: Mapping) -> MoeShape:
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    assert isinstance(text, Mapping)
    experts = next((text[k] for k in ("n_routed_experts", "num_experts", "num_local_experts") if text.get(k)), None)
    inter = text.get("moe_intermediate_size") or text.get("intermediate_size")
    missing = [name for name, v in (("n_routed_experts|num_experts|num_local_experts", experts),
                                    ("hidden_size", text.get("hidden_size")),
                                    ("moe_intermediate_size|intermediate_size", inter)) if not isinstance(v, int)]
    if missing:
        raise ConversionError(f"config.json{' text_config' if text is not config else ''} lacks {', '.join(missing)}: "
                              "the expert count and sizes come from there")
    layers = text.get("num_hidden_layers")
    if layers is not None and (not isinstance(layers, int) or layers <= 0):
        raise ConversionError(f"config.json: num_hidden_layers must be a positive integer, got {layers!r}")
    return MoeShape(int(experts), int(text["hidden_size"]), int(inter), layers)  # type: ignore[arg-type]


def find_experts(names: list[str], expr_of: Callable[[str], Expr], shape: MoeShape) -> ExpertLayers:
    """Experts per layer (checked complete and numbered 0..E-1) and the other tensors."""
    found = ExpertLayers()
    fp8_scales: set[str] = set()
    for original in names:
        name = strip_language_model(original)
        if name in found.renamed:
            raise ConversionError(f"tensors {found.renamed[name]} and {original} have the same name without "
                                  "'language_model.'")
        found.renamed[name] = original
        if not _EXPERT_SPACE.fullmatch(name):
            found.others.append(name)
            continue
        per = _PER_EXPERT.fullmatch(name)
        fused = _FUSED.fullmatch(name)
        if not per and not fused:
            if name.endswith(FP8_SCALE) and _PER_EXPERT.fullmatch(name[: -len(FP8_SCALE)]):
                fp8_scales.add(name)  # read with its weight
                continue
            raise ConversionError(f"tensor {original} is in a routed-expert module but is not a gate/up/down "
                                  "projection weight this format holds")
        layer = int((per or fused).group(1))  # type: ignore[union-attr]
        if shape.num_layers is not None and layer >= shape.num_layers:
            found.dropped_mtp.append(original)
            continue
        slot = found.layers.setdefault(layer, {})
        if per:
            proj = _PROJ[per.group(3)]
            key = (int(per.group(2)), proj)
            if key in slot:
                raise ConversionError(f"tensor {original}: layer {layer} expert {key[0]} has two {proj} projections "
                                      f"({slot[key].source})")
            slot[key] = Projection(expr_of(original), False, original)
        else:
            assert fused is not None
            _add_fused(slot, fused.group(2), original, expr_of(original), shape)
    for layer, slot in sorted(found.layers.items()):
        _check_layer(layer, slot, shape)
    return found


def _add_fused(slot: dict[tuple[int, str], Projection], param: str, name: str, expr: Expr, shape: MoeShape) -> None:
    h, i, e = shape.hidden, shape.intermediate, shape.num_experts
    if len(expr.shape) != 3 or expr.shape[0] != e:
        raise ConversionError(f"fused expert tensor {name} {list(expr.shape)}: expected 3-D with {e} experts first")
    rows = 2 * i if param == "gate_up_proj" else h  # HF [out, in] of one expert
    cols = h if param == "gate_up_proj" else i
    kt_layout = tuple(expr.shape[1:]) == (cols, rows)  # kt-kernel always transposes: [E, in, out]
    if not kt_layout and tuple(expr.shape[1:]) != (rows, cols):
        raise ConversionError(f"fused expert tensor {name} {list(expr.shape)}: expected [{e}, {cols}, {rows}] "
                              f"or [{e}, {rows}, {cols}] for hidden_size {h} and expert size {i}")
    for n in range(e):
        one = tx.narrow(expr, 0, n, 1)
        if param == "down_proj":
            slot[(n, "down")] = Projection(one, kt_layout, name)
            continue
        out_dim = 2 if kt_layout else 1
        slot[(n, "gate")] = Projection(tx.narrow(one, out_dim, 0, i), kt_layout, name)
        slot[(n, "up")] = Projection(tx.narrow(one, out_dim, i, i), kt_layout, name)


def _check_layer(layer: int, slot: dict[tuple[int, str], Projection], shape: MoeShape) -> None:
    numbers = sorted({e for e, _ in slot})
    if numbers[0] != 0:
        raise ConversionError(f"layer {layer}: routed experts are numbered from {numbers[0]}, not 0 "
                              f"(kt-kernel's loader counts experts from 0 until one is missing)")
    for e in range(max(shape.num_experts, numbers[-1] + 1)):
        for proj in PROJECTIONS:
            if (e, proj) not in slot:
                other = next((p for p in slot.values()), None)
                hint = f" (next to {other.source})" if other else ""
                raise ConversionError(f"layer {layer}: expert {e} has no {proj} projection{hint}; config.json "
                                      f"says {shape.num_experts} routed experts")
    if numbers[-1] >= shape.num_experts:
        raise ConversionError(f"layer {layer}: expert {numbers[-1]} is stored, but config.json says "
                              f"{shape.num_experts} routed experts")
    for (e, proj), p in slot.items():
        want = (shape.hidden, shape.intermediate) if proj == "down" else (shape.intermediate, shape.hidden)
        stored = tuple(p.expr.shape[-2:])
        got = stored[::-1] if p.transposed else stored
        if got != want:
            raise ConversionError(f"tensor {p.source}: layer {layer} expert {e} {proj} projection is "
                                  f"{list(got)} ([out, in]), config.json implies {list(want)}")
        if not (p.expr.dtype.is_floating_point or tx.is_fp8(p.expr)):
            raise ConversionError(f"tensor {p.source} is {tx.dtype_name(p.expr.dtype)}: quantized experts need a "
                                  "--converter (e.g. dequantize) first")


def expert_dtype(expr: Expr) -> str:
    """bf16 / fp16 / fp32 / fp8: what kt-kernel's --input-type calls it."""
    if tx.is_fp8(expr):
        return "fp8"
    return {dtypes.BFLOAT16: "bf16", dtypes.FLOAT16: "fp16", dtypes.FLOAT32: "fp32"}.get(expr.dtype, tx.dtype_name(expr.dtype))
