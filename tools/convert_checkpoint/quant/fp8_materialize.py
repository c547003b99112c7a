"""Build the block-FP8 tensors of an output file: keep, requantize or quantize, and say which.

Plan time decides what only the layout can tell (a cut through a 128-block becomes a
``Quantize`` node with its reason). Here, with the data at hand, the scale style is checked:
kept blocks whose scales are not in the style ``--force_pow_2_scales`` asks for are
requantized too, unless ``--fp8_force_no_requant``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch

from .. import dtypes
from .. import tensor_expr as te
from ..dtypes import DType
from .fp8_block import Fp8Recipe, dequantize_blocks, quantize_blocks, scales_are_pow2

KEPT, REQUANTIZED, QUANTIZED = "kept", "requantized", "quantized"


@dataclass(frozen=True)
class Fp8Policy:
    recipe: Fp8Recipe = Fp8Recipe()
    force_no_requant: bool = False
    nominal_dtype: DType = dtypes.BFLOAT16  # the dtype TE's FP8 parameters present as


@dataclass(frozen=True)
class Fp8Event:
    """What happened to one FP8 output tensor."""

    tensor: str
    action: str  # kept / requantized / quantized
    reason: str
    pow2: bool  # every written scale is a power of two


def _style(pow2: bool) -> str:
    return "powers of two" if pow2 else "not all powers of two"


class Fp8Materializer:
    """Materializes ``Fp8Blocks``/``Quantize`` expressions to ``(codes, scale_inv)``.

    The last result is cached, so an HF file's ``weight`` and ``weight_scale_inv`` (two
    ``Fp8Part`` jobs of one expression) are computed once."""

    def __init__(self, reader, policy: Fp8Policy):
        self._reader = reader
        self._policy = policy
        self._last: tuple[object, tuple[torch.Tensor, torch.Tensor, str, str]] | None = None
        self.events: list[Fp8Event] = []

    def pair(self, expr: te.Fp8Blocks | te.Quantize, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._last is not None and self._last[0] is expr:
            codes, scale, _, _ = self._last[1]
            return codes, scale
        codes, scale, action, reason = self._build(expr)
        self._last = (expr, (codes, scale, action, reason))
        self.events.append(Fp8Event(name, action, reason, scales_are_pow2(scale)))
        return codes, scale

    def part(self, expr: te.Fp8Part, name: str) -> torch.Tensor:
        codes, scale = self.pair(expr.of, name)
        return codes if expr.which == "codes" else scale

    def _build(self, expr) -> tuple[torch.Tensor, torch.Tensor, str, str]:
        recipe = self._policy.recipe
        if isinstance(expr, te.Fp8Blocks):
            codes = te.materialize(expr.data, self._reader)
            scale = te.materialize(expr.scale, self._reader)
            pow2 = scales_are_pow2(scale)
            if pow2 == recipe.pow2 or self._policy.force_no_requant:
                return codes, scale, KEPT, ""
            names = ", ".join(sorted({leaf.ref.name for leaf in te.leaves(expr.data)})[:2])
            reason = f"{names}: scales are {_style(pow2)}, --force_pow_2_scales {str(recipe.pow2).lower()}"
            values = dequantize_blocks(codes, scale)
            codes, scale = quantize_blocks(values, recipe)
            return codes, scale, REQUANTIZED, reason
        if isinstance(expr, te.Quantize):
            values = te.materialize(expr.part, self._reader)
            codes, scale = quantize_blocks(values, recipe)
            return codes, scale, (REQUANTIZED if te.is_fp8(expr.part) else QUANTIZED), expr.reason
        raise TypeError(f"not a block-FP8 expression: {type(expr).__name__}")
