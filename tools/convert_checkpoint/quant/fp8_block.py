"""128x128 block-scaled FP8 (e4m3): quantize and dequantize, in pure torch or through TE.

A block-scaled weight is a pair: ``codes`` (float8_e4m3fn, the tensor's shape) and ``scale_inv``
(float32, one dequant multiplier per 128x128 block, ``[ceil(rows/128), ceil(cols/128)]``), so
``W[i, j] = codes[i, j] * scale_inv[i // 128, j // 128]``. DeepSeek's HF checkpoints and TE's
``Float8BlockwiseQTensor`` share this layout (TE pads the scale grid's columns to a multiple of
4; that padding lives in ``te_pickle``).

The ``pt`` quantizer follows TE's blockwise kernel step by step (``compute_scale_from_amax`` in
TE's ``recipe_common.cuh`` and the cast in ``quantize_transpose_square_blockwise.cu``), so it
gives TE's bytes without TE or a GPU:

1. per block ``amax = max |x|`` in fp32 (NaN elements do not count, as with ``fmaxf``),
   floored at ``amax_epsilon``;
2. ``amax == 0`` or infinite: quantization multiplier ``S = 1``; otherwise ``S = RN(448 / amax)``,
   an infinite ``S`` becomes the input dtype's largest finite value;
3. power-of-two scales: ``S`` keeps only its sign and exponent bits (``& 0xFF800000``), i.e. the
   largest power of two <= 448/amax. This equals DeepGEMM's ``ceil_to_ue8m0(amax / 448)``;
4. ``scale_inv = 1 / S`` and ``codes = e4m3(clamp(x * S, -448, 448))`` (round to nearest even;
   the clamp keeps values past 448 finite on every torch backend, like TE's ``satfinite``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch

from .compiled import CompiledOrEager

BLOCK = 128
E4M3_MAX = 448.0
QUANT_METHODS = ("pt", "te")
_EXPONENT_MASK = -8388608  # 0xFF800000 as int32: sign and exponent bits of an fp32


@dataclass(frozen=True)
class Fp8Recipe:
    """How block scales are chosen (``--force_pow_2_scales``, ``--amax_epsilon``) and computed
    (``--quant_method``, ``--device``)."""

    pow2: bool = True
    amax_epsilon: float = 0.0
    method: str = "pt"
    device: str = "cpu"

    def describe(self) -> str:
        scales = "power-of-two" if self.pow2 else "fp32"
        return f"{scales} scales, amax epsilon {self.amax_epsilon:g}, {self.method} quantizer on {self.device}"


def scale_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    rows, cols = shape
    return -(-rows // BLOCK), -(-cols // BLOCK)


def scales_are_pow2(scale_inv: torch.Tensor) -> bool:
    """True when every scale is an exact (positive, normal) power of two."""
    bits = scale_inv.contiguous().view(torch.int32)
    return bool(((bits & 0x007FFFFF) == 0).all() and (bits > 0).all() and (bits < 0x7F800000).all())


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x`` zero-padded to whole blocks and viewed as [row blocks, 128, col blocks, 128]."""
    rows, cols = x.shape
    pad_r, pad_c = (-rows) % BLOCK, (-cols) % BLOCK
    if pad_r or pad_c:
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
    rb, cb = x.shape[0] // BLOCK, x.shape[1] // BLOCK
    return x.view(rb, BLOCK, cb, BLOCK), rows, cols


def quantization_multipliers(amax: torch.Tensor, recipe: Fp8Recipe, input_dtype: torch.dtype) -> torch.Tensor:
    """TE's ``compute_scale_from_amax`` on a tensor of fp32 block amaxes: the multipliers ``S``."""
    amax = amax.float()
    if recipe.amax_epsilon > 0:
        amax = torch.clamp_min(amax, recipe.amax_epsilon)
    scale = torch.div(E4M3_MAX, amax)
    scale = torch.where(torch.isinf(scale), torch.finfo(input_dtype).max, scale)
    if recipe.pow2:
        scale = (scale.view(torch.int32) & _EXPONENT_MASK).view(torch.float32)
    special = (amax == 0) | torch.isinf(amax) | torch.isnan(amax)
    return torch.where(special, torch.ones_like(scale), scale)


# Rows quantized at a time on CPU: bounds the fp32 temporaries (a few copies of the chunk) for
# the largest weights (DeepSeek-V3's 18432x7168) to a few hundred MB per worker.
_CPU_CHUNK_ELEMENTS = 1 << 24


def _quantize_pt(x: torch.Tensor, recipe: Fp8Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cuda":
        return _quantize_pt_cuda(x, recipe)
    rows = x.shape[0]
    step = max(1, _CPU_CHUNK_ELEMENTS // max(1, x.shape[1]) // BLOCK) * BLOCK
    if x.device.type != "cpu" or rows <= step:
        return _quantize_pt_whole(x, recipe)
    parts = [_quantize_pt_whole(x[r:r + step], recipe) for r in range(0, rows, step)]
    return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])


def _quantize_pt_whole(x: torch.Tensor, recipe: Fp8Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    input_dtype = x.dtype if x.dtype.is_floating_point and x.dtype.itemsize >= 2 else torch.float32
    blocks, rows, cols = _blocks(x)
    amax = blocks.abs().amax(dim=(1, 3)).float()  # |x| and max are exact in x's own dtype
    nan_blocks = torch.isnan(amax)
    if nan_blocks.any():  # NaN elements do not count (TE's fmaxf); rare, so only those blocks pay
        clean = torch.nan_to_num(blocks.abs(), nan=0.0).amax(dim=(1, 3)).float()
        amax = torch.where(nan_blocks, clean, amax)
    scale = quantization_multipliers(amax, recipe, input_dtype)
    # x * S in fp32 (type promotion upcasts x exactly), one rounding, as TE's kernel does.
    scaled = torch.mul(blocks, scale[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    codes = scaled.to(torch.float8_e4m3fn).view(blocks.shape[0] * BLOCK, blocks.shape[2] * BLOCK)
    if nan_blocks.any():  # CPU casts keep a NaN's sign (0xFF); TE and CUDA write 0x7F
        raw = codes.view(torch.uint8)
        raw[raw == 0xFF] = 0x7F
    return codes[:rows, :cols].contiguous(), torch.reciprocal(scale)


def _codes_and_multipliers(x: torch.Tensor, recipe: Fp8Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The pt quantizer without data-dependent branches (NaN elements zeroed for the amax
    unconditionally), so that ``torch.compile`` fuses it into one graph on a GPU."""
    input_dtype = x.dtype if x.dtype.is_floating_point and x.dtype.itemsize >= 2 else torch.float32
    blocks, rows, cols = _blocks(x)
    magnitude = blocks.abs()
    amax = torch.where(torch.isnan(magnitude), 0.0, magnitude).amax(dim=(1, 3)).float()
    scale = quantization_multipliers(amax, recipe, input_dtype)
    scaled = torch.mul(blocks, scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    codes = scaled.to(torch.float8_e4m3fn).view(blocks.shape[0] * BLOCK, blocks.shape[2] * BLOCK)
    return codes[:rows, :cols].contiguous(), scale


_CUDA_QUANTIZERS: dict[Fp8Recipe, CompiledOrEager] = {}


def _quantize_pt_cuda(x: torch.Tensor, recipe: Fp8Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """On a GPU the branch-free quantizer is compiled into one fused kernel (about 1.2 TB/s of
    bf16 on an H100, TE's bytes; eager torch makes ~8 passes, ~130 GB/s). ``1/S`` stays eager
    because Inductor's reciprocal is not IEEE-rounded."""
    fn = _CUDA_QUANTIZERS.setdefault(recipe, CompiledOrEager(_codes_and_multipliers))
    codes, scale = fn(x, recipe)
    return codes, torch.reciprocal(scale)


def _quantize_te(x: torch.Tensor, recipe: Fp8Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    quantizer = te_block_quantizer(recipe)
    qt = quantizer(x.contiguous())
    rows, cols = scale_shape(tuple(x.shape))
    return qt._rowwise_data.view(torch.float8_e4m3fn).clone(), qt._rowwise_scale_inv[:rows, :cols].clone()


def te_block_quantizer(recipe: Fp8Recipe):
    """TE's ``Float8BlockQuantizer`` for 2-D 128x128 blocks, rowwise only (imported lazily)."""
    import transformer_engine.pytorch  # noqa: F401  (registers the extension)
    import transformer_engine_torch as tex
    from transformer_engine.pytorch.tensor.float8_blockwise_tensor import (
        Float8BlockQuantizer,
    )

    return Float8BlockQuantizer(
        fp8_dtype=tex.DType.kFloat8E4M3,
        rowwise=True,
        columnwise=False,
        amax_epsilon=recipe.amax_epsilon,
        force_pow_2_scales=recipe.pow2,
        block_scaling_dim=2,
    )


def te_unavailable_reason() -> str | None:
    """None when TE's blockwise quantizer can run here, else why not."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        import transformer_engine_torch  # noqa: F401
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken build raising anything)
        return f"transformer-engine is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    from ..devices import cuda_device_count  # without initializing CUDA: the workers are forked

    if cuda_device_count() == 0:
        return "transformer-engine quantizes on a GPU and no CUDA device is visible"
    return None


def quantize_blocks(x: torch.Tensor, recipe: Fp8Recipe = Fp8Recipe()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale_inv)`` of a 2-D tensor; math on ``recipe.device``, results on ``x``'s device."""
    if x.dim() != 2:
        raise ValueError(f"block FP8 quantization needs a 2-D tensor, got shape {list(x.shape)}")
    home = x.device
    device = torch.device("cuda") if recipe.method == "te" else torch.device(recipe.device)
    work = x.to(device) if x.device != device else x
    if recipe.method == "te":
        codes, scale_inv = _quantize_te(work, recipe)
    elif recipe.method == "pt":
        codes, scale_inv = _quantize_pt(work, recipe)
    else:
        raise ValueError(f"unknown quant method {recipe.method!r}; known: {', '.join(QUANT_METHODS)}")
    return codes.to(home), scale_inv.to(home)


def dequantize_blocks(codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``codes * scale_inv`` per block, formed in fp32 (exact for power-of-two scales), then cast."""
    if codes.dim() != 2:
        raise ValueError(f"block FP8 tensors are 2-D, got shape {list(codes.shape)}")
    if tuple(scale_inv.shape) != scale_shape(tuple(codes.shape)):
        raise ValueError(
            f"scale grid {list(scale_inv.shape)} does not match FP8 data {list(codes.shape)} "
            f"(expected {list(scale_shape(tuple(codes.shape)))} for 128x128 blocks)"
        )
    blocks, rows, cols = _blocks(codes.float())
    values = blocks * scale_inv.float()[:, None, :, None]
    values = values.view(blocks.shape[0] * BLOCK, blocks.shape[2] * BLOCK)[:rows, :cols]
    return values.to(dtype) if dtype not in (None, torch.float32) else values.contiguous()


def block_aligned(start: int, length: int, size: int) -> bool:
    """A window ``[start, start + length)`` of a dimension of ``size`` keeps whole 128-blocks:
    it starts on a block boundary and ends on one or at the end of the dimension."""
    end = start + length
    return start % BLOCK == 0 and (end % BLOCK == 0 or end == size)


def block_count(length: int) -> int:
    return math.ceil(length / BLOCK)
