"""TE ``Float8BlockwiseQTensor`` objects in Megatron legacy rank files, without TE.

Megatron's legacy checkpoints (``torch.save`` of the state dict) pickle an FP8 parameter
through ``Float8BlockwiseQTensor.__reduce_ex__``: a call of TE's rebuild function with the raw
e4m3 bytes, the padded scale grid and the quantizer. This module writes that same pickle with
no TE installed (stand-in objects whose globals are written under TE's module paths), and reads
it, from us or from TE, with torch's ``weights_only`` unpickler: the TE globals are mapped to
plain record builders here, so loading never imports TE and never runs code from the file.

Layout of TE 2.x (``transformer_engine/pytorch/tensor/float8_blockwise_tensor.py``):
``_make_float8_blockwise_tensor_in_reduce_ex(shape, rowwise_data uint8 [M, K],
rowwise_scale_inv fp32 [ceil(M/128), roundup4(ceil(K/128))], columnwise_data,
columnwise_scale_inv, fp8_dtype, dtype, quantizer, is_2D_scaled, data_format)``; TE <= 2.9
pickled the classmethod ``Float8BlockwiseQTensor._make_in_reduce_ex`` (via ``getattr``) with
the first nine arguments. The quantizer is a plain object (``Float8BlockQuantizer``) pickled
with its ``__dict__``; its ``dtype`` is TE's ``DType`` enum (``kFloat8E4M3 = 7``).
"""
from __future__ import annotations

import argparse
import pickle
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch

from .. import dtypes
from ..formats.stand_in_pickle import Global, InstanceValue, StandInPickler
from .fp8_block import BLOCK, scale_shape

_TE_TENSOR_MODULE = "transformer_engine.pytorch.tensor.float8_blockwise_tensor"
REBUILD_PATH = f"{_TE_TENSOR_MODULE}._make_float8_blockwise_tensor_in_reduce_ex"
TENSOR_CLASS_PATH = f"{_TE_TENSOR_MODULE}.Float8BlockwiseQTensor"
QUANTIZER_PATH = f"{_TE_TENSOR_MODULE}.Float8BlockQuantizer"
DTYPE_PATH = "transformer_engine.pytorch.constants.DType"  # TE >= 2.10 (an IntEnum)
LEGACY_DTYPE_PATH = "transformer_engine_torch.DType"  # older TE: the pybind11 enum
TE_FLOAT8_E4M3 = 7  # transformer_engine::DType::kFloat8E4M3


def padded_scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """TE's 2-D block scale grid: columns rounded up to a multiple of 4 for its GEMMs."""
    rows, cols = scale_shape(shape)
    return rows, -(-cols // 4) * 4


# --- reading -------------------------------------------------------------------------------

@dataclass
class Fp8BlockRecord:
    """What a pickled ``Float8BlockwiseQTensor`` holds, as plain tensors."""

    shape: tuple[int, ...]
    rowwise_data: torch.Tensor  # uint8 e4m3 bits
    rowwise_scale_inv: torch.Tensor  # fp32, TE-padded
    nominal_dtype: torch.dtype
    quantizer: dict
    is_2d_scaled: bool
    fp8_dtype: int

    dtype = dtypes.FLOAT8_E4M3FN  # what the converter sees: block FP8 codes

    @property
    def codes(self) -> torch.Tensor:
        return self.rowwise_data.view(torch.float8_e4m3fn)

    @property
    def scale_inv(self) -> torch.Tensor:
        rows, cols = scale_shape(self.shape)
        return self.rowwise_scale_inv[:rows, :cols]

    @property
    def pow2(self) -> bool | None:
        return self.quantizer.get("force_pow_2_scales")

    @property
    def amax_epsilon(self) -> float | None:
        return self.quantizer.get("amax_epsilon")

    def check(self, where: str) -> None:
        """Only 2-D 128x128 e4m3 blocks with rowwise data are understood."""
        if self.fp8_dtype != TE_FLOAT8_E4M3:
            raise ValueError(f"{where}: FP8 tensor of TE dtype {self.fp8_dtype}; only e4m3 (7) is supported")
        if not self.is_2d_scaled or self.quantizer.get("block_scaling_dim", 2) != 2:
            raise ValueError(f"{where}: 1x128-block FP8 tensor; only 128x128 weight blocks are supported")
        if self.rowwise_data is None or self.rowwise_scale_inv is None:
            raise ValueError(f"{where}: FP8 tensor without rowwise data")
        if len(self.shape) != 2 or tuple(self.rowwise_data.shape) != tuple(self.shape):
            raise ValueError(f"{where}: FP8 data of shape {list(self.rowwise_data.shape)} for a tensor of shape {list(self.shape)}")
        need = scale_shape(self.shape)
        have = tuple(self.rowwise_scale_inv.shape)
        if len(have) != 2 or have[0] < need[0] or have[1] < need[1]:
            raise ValueError(f"{where}: scale grid {list(have)} is smaller than the {list(need)} blocks of {list(self.shape)}")
        if self.quantizer.get("block_len", BLOCK) != BLOCK:
            raise ValueError(f"{where}: FP8 block length {self.quantizer.get('block_len')}; only 128 is supported")


def _rebuild_blockwise(shape, rowwise_data, rowwise_scale_inv, columnwise_data, columnwise_scale_inv,
                       fp8_dtype, dtype, quantizer, is_2d_scaled, data_format=None) -> Fp8BlockRecord:
    state = {k: (int(v) if k == "dtype" else v) for k, v in vars(quantizer).items()} if quantizer is not None else {}
    return Fp8BlockRecord(tuple(int(s) for s in shape), rowwise_data, rowwise_scale_inv, dtype, dict(state),
                          bool(is_2d_scaled), int(fp8_dtype))


class _QuantizerState:
    """Stands in for TE's ``Float8BlockQuantizer`` when unpickling: keeps its attributes only."""


class _TensorClassStub:
    """Stands in for TE's ``Float8BlockwiseQTensor`` class (only its old rebuild classmethod)."""

    _make_in_reduce_ex = staticmethod(_rebuild_blockwise)


class _LegacyDType:
    """TE's pybind11 ``DType`` enum (older TE): pickled as ``NEWOBJ`` + its integer as state."""

    def __init__(self, value: int = -1):
        self.value = int(value)

    def __setstate__(self, state) -> None:
        self.value = int(state)

    def __int__(self) -> int:
        return self.value


def _te_dtype(value) -> int:
    return int(value)


def _safe_getattr(obj, name):
    """``getattr`` as TE <= 2.9 pickles use it: only the rebuild classmethod of the stub."""
    if obj is _TensorClassStub and name == "_make_in_reduce_ex":
        return _rebuild_blockwise
    raise pickle.UnpicklingError(f"refusing getattr({obj!r}, {name!r}) in a checkpoint")


_ALLOWED: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    argparse.Namespace,
    (_rebuild_blockwise, REBUILD_PATH),
    (_TensorClassStub, TENSOR_CLASS_PATH),
    (_QuantizerState, QUANTIZER_PATH),
    (_te_dtype, DTYPE_PATH),
    (_LegacyDType, LEGACY_DTYPE_PATH),
    (_safe_getattr, "builtins.getattr"),
]


def allow_in_torch_load() -> None:
    """Let a plain weights_only ``torch.load`` read TE FP8 parameters as records too (done by
    :func:`save` and :func:`load`, not at import: importing this module must not import torch)."""
    torch.serialization.add_safe_globals(_ALLOWED)


# --- the rest of a Megatron training checkpoint --------------------------------------------
# Megatron's training loop saves, next to the model: the optimizer state and the LR scheduler
# (tensors, numbers and plain containers: no global needed), ``num_floating_point_operations_so_far``
# and ``rng_state``, whose numpy part (``np.random.get_state()``) pickles a uint32 ndarray through
# numpy's ``_reconstruct``, ``ndarray`` and ``dtype``. Its ``args`` hold Megatron enums
# (``attention_backend`` is an ``AttnBackend`` by default; ``cuda_graph_scope`` may list
# ``CudaGraphScope`` members), and TE before 1.6 saved ``_extra_state`` as an ``io.BytesIO``.
# The converter reads none of these values. Each of exactly these globals is mapped to an inert
# stand-in that only keeps its pickled arguments and state, so loading runs no numpy, Megatron or
# io code, and every other global (``os.system`` ...) is still refused. Active only inside
# :func:`load`, never for a plain ``torch.load``.

class ForeignValue:
    """A value of an allow-listed foreign global, kept as pickled (``path``: the global)."""

    path = ""
    args: tuple = ()  # what the global was called with (none when unpickled as NEWOBJ + BUILD)
    state: Any = None  # what BUILD gave it

    def __init__(self, *args: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.path}{self.args!r}>"


def _foreign(path: str) -> type[ForeignValue]:
    return type(path.rsplit(".", 1)[1], (ForeignValue,), {"path": path})


_NDARRAY = _foreign("numpy.ndarray")


def _numpy_reconstruct(cls: Any, shape: Any, typecode: Any) -> ForeignValue:
    """numpy's ``_reconstruct(ndarray, (0,), b'b')``: an empty array that BUILD then fills."""
    return _NDARRAY(shape, typecode)


TRAINING_STATE: list[tuple[Callable[..., Any], str]] = [
    (_numpy_reconstruct, "numpy.core.multiarray._reconstruct"),  # numpy 1.x
    (_numpy_reconstruct, "numpy._core.multiarray._reconstruct"),  # numpy 2.x
    (_NDARRAY, "numpy.ndarray"),
    (_foreign("numpy.dtype"), "numpy.dtype"),
    (_foreign("megatron.core.transformer.enums.AttnBackend"), "megatron.core.transformer.enums.AttnBackend"),
    (_foreign("megatron.core.transformer.enums.CudaGraphScope"), "megatron.core.transformer.enums.CudaGraphScope"),
    (_foreign("_io.BytesIO"), "_io.BytesIO"),
]


def load(path: str | IO[bytes], mmap: bool = True) -> Any:
    """A Megatron rank file (or a torch_dist chunk), weights only: FP8 parameters come back as :class:`Fp8BlockRecord`,
    the foreign values of a training checkpoint as :class:`ForeignValue`.

    Only this module's allow-list is active during the load: TE, when imported, registers its
    real classes under the same names, and those must not be the ones the file reaches."""
    allow_in_torch_load()
    previous = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(_ALLOWED + list(TRAINING_STATE))
    try:
        return torch.load(path, map_location="cpu", mmap=mmap and isinstance(path, str), weights_only=True)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(previous)


# --- writing -------------------------------------------------------------------------------

_REBUILD = Global(REBUILD_PATH)
_QUANTIZER_CLASS = Global(QUANTIZER_PATH)
_DTYPE_CLASS = Global(DTYPE_PATH)


class _TEDTypeValue:
    def __init__(self, value: int):
        self.value = value

    def __reduce_ex__(self, protocol):  # what an IntEnum member reduces to: DType(value)
        return (_DTYPE_CLASS, (self.value,))


class BlockwiseParam:
    """An FP8 weight that pickles as TE's ``Float8BlockwiseQTensor`` (rowwise data only, like
    the incumbent and Megatron's legacy checkpoints after loading)."""

    def __init__(self, codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, pow2: bool, amax_epsilon: float):
        rows, cols = codes.shape
        if tuple(scale_inv.shape) != scale_shape((rows, cols)):
            raise ValueError(f"scale grid {list(scale_inv.shape)} does not match FP8 data {list(codes.shape)}")
        self.shape = torch.Size((rows, cols))
        self.rowwise_data = codes.contiguous().view(torch.uint8)
        padded = torch.zeros(padded_scale_shape((rows, cols)), dtype=torch.float32)
        padded[: scale_inv.shape[0], : scale_inv.shape[1]] = scale_inv
        self.rowwise_scale_inv = padded
        self.dtype = dtype
        self.quantizer_state = {
            # Quantizer.__init__, then Float8BlockQuantizer.__init__ (attribute order kept)
            "rowwise_usage": True,
            "columnwise_usage": False,
            "internal": False,
            "optimize_for_gemm": False,
            "dtype": _TEDTypeValue(TE_FLOAT8_E4M3),
            "block_len": BLOCK,
            "force_pow_2_scales": bool(pow2),
            "amax_epsilon": float(amax_epsilon),
            "block_scaling_dim": 2,
        }

    def __reduce_ex__(self, protocol):
        # One DType object for the tensor and its quantizer, pickled once and then referenced,
        # as in TE's own pickles.
        return (_REBUILD, (self.shape, self.rowwise_data, self.rowwise_scale_inv, None, None,
                           self.quantizer_state["dtype"], self.dtype, InstanceValue(_QUANTIZER_CLASS, self.quantizer_state),
                           True, None))


def blockwise_param(codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype | None = None,
                    pow2: bool = True, amax_epsilon: float = 0.0) -> BlockwiseParam:
    return BlockwiseParam(codes, scale_inv, dtype or torch.bfloat16, pow2, amax_epsilon)


def _module_for_torch_save() -> types.ModuleType:
    """What ``torch.save(pickle_module=...)`` needs: a module-like object with ``Pickler``."""
    module = types.ModuleType(f"{__name__}.pickle")
    vars(module).update(Pickler=StandInPickler, Unpickler=pickle.Unpickler, HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL)
    return module


PICKLE_MODULE = _module_for_torch_save()


def save(obj: Any, path: str) -> None:
    """``torch.save`` that writes :class:`BlockwiseParam` entries as TE tensors."""
    allow_in_torch_load()
    torch.save(obj, path, pickle_module=PICKLE_MODULE)
