"""Element types of planned tensors, without importing torch.

Planning a conversion needs only each tensor's element type and size; importing torch for that
costs seconds of start-up (more than the whole copy of a small checkpoint), and a conversion
that only moves bytes never needs torch at all. :class:`DType` names one element type the way
torch does (``bfloat16``); :attr:`DType.torch` gives the torch dtype where values are computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class DType:
    """One element type: ``name`` is torch's (``torch.<name>``), ``code`` safetensors' (``BF16``).
    There is one object per type (the constants below), so equality is identity: plans compare
    dtypes hundreds of thousands of times."""

    name: str
    itemsize: int
    is_floating_point: bool
    code: str | None = None  # None: safetensors has no name for it

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"dtypes.{self.name.upper()}"

    def __reduce__(self) -> tuple:  # unpickled as the same constant
        return named, (self.name,)

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.name)


FLOAT64 = DType("float64", 8, True, "F64")
FLOAT32 = DType("float32", 4, True, "F32")
FLOAT16 = DType("float16", 2, True, "F16")
BFLOAT16 = DType("bfloat16", 2, True, "BF16")
FLOAT8_E4M3FN = DType("float8_e4m3fn", 1, True, "F8_E4M3")
FLOAT8_E5M2 = DType("float8_e5m2", 1, True, "F8_E5M2")
INT64 = DType("int64", 8, False, "I64")
INT32 = DType("int32", 4, False, "I32")
INT16 = DType("int16", 2, False, "I16")
INT8 = DType("int8", 1, False, "I8")
UINT8 = DType("uint8", 1, False, "U8")
BOOL = DType("bool", 1, False, "BOOL")

ALL: tuple[DType, ...] = (FLOAT64, FLOAT32, FLOAT16, BFLOAT16, FLOAT8_E4M3FN, FLOAT8_E5M2,
                          INT64, INT32, INT16, INT8, UINT8, BOOL)
_BY_NAME = {d.name: d for d in ALL}
BY_CODE: dict[str, DType] = {d.code: d for d in ALL if d.code}


def named(name: str) -> DType:
    """``bfloat16`` or ``torch.bfloat16`` -> BFLOAT16; KeyError for a type this tool does not plan."""
    return _BY_NAME[name.removeprefix("torch.")]


def of(value: Any) -> DType:
    """The DType of a torch dtype, a tensor (its ``dtype``) or a DType."""
    if isinstance(value, DType):
        return value
    dtype = getattr(value, "dtype", value)  # a tensor, or a dtype itself
    try:
        return named(str(dtype))
    except KeyError:
        raise TypeError(f"element type {dtype} is not one this converter plans with") from None
