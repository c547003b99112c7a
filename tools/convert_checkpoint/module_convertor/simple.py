"""One HF tensor <-> one canonical tensor: norms, plain column/row-parallel linears."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
else:
    pass

from .. import dtypes
from .. import tensor_expr as te
from ..core.canonical import Split
from ..errors import ConversionError
from ..tensor_expr import Expr
from .base import CanonicalTensor, ModuleConvertor, register

_DTYPES = {"float32": dtypes.FLOAT32, "bfloat16": dtypes.BFLOAT16, "float16": dtypes.FLOAT16}  # plus fp8 (a marker)


class _OneToOne(ModuleConvertor):
    options = ("hf", "mcore", "shape", "te_split", "dtype", "linear")
    required = ("hf", "mcore")
    dtypes = ("fp8", *_DTYPES)
    split: Split = Split.REPLICATED
    is_linear = False
    default_shape: list = ["hidden_size"]

    def _hf(self) -> str:
        return self.hf_name(self.opt("hf"))

    def _mcore(self) -> str:
        return self.mcore_name(self.opt("mcore"))

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self._hf(): self.shape_option(self.default_shape)}

    def canonical(self) -> list[CanonicalTensor]:
        name = self._mcore()
        # ``linear: true``: a replicated weight that belongs to a linear module (DSA's indexer linears,
        # TE 'duplicated' linears), so it gets the module's ``_extra_state`` like any linear.
        module = name.rsplit(".", 1)[0] if self.is_linear or self.opt("linear") else None
        return [CanonicalTensor(name, self.shape_option(self.default_shape), self.split, module, te_split=self._te_split())]

    def _te_split(self) -> Split | None:
        """``te_split: replicated``: TE keeps the full tensor on every TP rank (MLA down-projections,
        TE ``duplicated`` linears) while the local spec splits it."""
        value = self.opt("te_split")
        if value is None:
            return None
        try:
            return Split(value)
        except ValueError:
            raise ConversionError(f"{self.spec.origin}: te_split must be one of {', '.join(s.value for s in Split)}") from None

    def to_canonical(self, hf: Mapping[str, Expr]) -> dict[str, Expr]:
        return {self._mcore(): self._cast(hf[self._hf()])}

    def to_hf(self, canonical: Mapping[str, Expr]) -> dict[str, Expr]:
        return {self._hf(): self._cast(canonical[self._mcore()])}

    def _cast(self, expr: Expr) -> Expr:
        """``dtype: float32``: the tensor is kept in that dtype both ways (Megatron keeps the
        router expert bias in fp32 whatever the model dtype; DeepSeek's HF files do too)."""
        name = self.opt("dtype")
        if name is None or name == "fp8":  # fp8: stored quantized, decided by the planner
            return expr
        return te.cast(expr, _DTYPES[name])


@register
class Norm(_OneToOne):
    """RMSNorm/LayerNorm weight (or bias), q/k layernorm: replicated on every TP rank."""

    kind = "norm"
    help = "one tensor, same layout (norms, q/k norms); TP: replicated"


@register
class ColumnParallelLinear(_OneToOne):
    """A linear whose output rows are split over TP (weight, or its bias with shape [out])."""

    kind = "column_parallel"
    help = "one tensor, same layout; TP: rows (dim 0); `te_split: replicated` for linears the TE spec keeps whole"
    split = Split.COLUMN
    is_linear = True


@register
class RowParallelLinear(_OneToOne):
    """A linear whose input columns are split over TP (attention output, MLP fc2)."""

    kind = "row_parallel"
    help = "one tensor, same layout; TP: columns (dim 1)"
    split = Split.ROW
    is_linear = True


@register
class Replicated(_OneToOne):
    """Any other tensor kept whole on every TP rank (router weight, router expert bias)."""

    kind = "replicated"
    help = "one tensor, same layout (MoE router weight, router expert bias; `dtype: float32` fixes its dtype); TP: replicated"


@register
class HeadParallel(_OneToOne):
    """A per-attention-head vector (GPT-OSS's attention sinks): split over TP by heads, not a linear."""

    kind = "head_parallel"
    help = "one per-head vector (attention sinks ↔ `core_attention.softmax_offset`); TP: by heads (dim 0), no `_extra_state`"
    split = Split.COLUMN
    default_shape = ["num_attention_heads"]
