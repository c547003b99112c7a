"""compressed-tensors' weight quantization for FP8, INT8 and NVFP4, one compiled function each.

``quantize(w, scheme, global_scale)`` returns what the library path returns for the same weight
with the ``fp32`` rounding (its min-max observer, ``calculate_qparams``, then the compressor):
same names, order, dtypes and bytes; or None for a case it does not cover. On a GPU the library
path takes several kernels and a host synchronisation per weight (``calculate_qparams`` builds its
epsilon on the host), so a layer's seven weights cost milliseconds of launches and waits for
microseconds of work. Here the min/max reduction, the scale and the codes are one function that
``torch.compile`` turns into one or two kernels, with eager torch's numerics (``compiled.py``:
IEEE division, bf16/fp16 intermediates rounded as eager rounds them), and nothing waits.

The library's formulas, restated (``quantization/utils/helpers.py``, ``lifecycle/forward*.py``,
the compressors), for a weight ``x`` in dtype ``d``:

* observer: ``lo, hi`` = min and max per row (channel), per 128x128 block, per 16 columns;
* scale (symmetric): ``s = max(|min(lo, 0)|, |max(hi, 0)|) / (range / 2)`` in ``d``, where
  range/2 is 448 (FP8), 127.5 (INT8) or 6 (FP4); NVFP4 then ``s = e4m3(g * s)`` in fp32 with the
  global scale ``g``; a zero scale becomes the scale dtype's epsilon (``d``'s, or 0.125 for e4m3);
* codes, dividing in fp32: FP8 ``e4m3(clamp(x / s, ±448))``; INT8
  ``int8(round_half_even(clamp(x / s, -128, 127)))``; NVFP4 ``x / (s / g)`` clamped to ±6 and
  rounded on the E2M1 grid with the library's thresholds (ties to the even code), sign bit 8 for
  negative values (also those that round to zero), two codes per byte, even column low.

Covered by tests against the library on CPU (ties and edge values included) and by
``benchmarks/quantize_cuda_check.py`` / ``quantize_benchmark.py --check-bytes`` on a GPU.
"""
from __future__ import annotations

from typing import Any

import torch

from .compiled import CompiledOrEager

E4M3_MAX = 448.0
_E4M3_EPS = 0.125
_NVFP4_GROUP = 16


def _symmetric_scale(low: torch.Tensor, high: torch.Tensor, half_range: float) -> torch.Tensor:
    zero = torch.zeros_like(low)
    magnitude = torch.maximum(torch.minimum(low, zero).abs(), torch.maximum(high, zero).abs())
    return magnitude / torch.full_like(magnitude, half_range)


def _with_eps(scale: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def _fp8_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    scale = _with_eps(_symmetric_scale(low, high, E4M3_MAX), torch.finfo(x.dtype).eps)
    codes = (x.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return scale, codes


def _fp8_blocks(x: torch.Tensor, bh: int, bw: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    blocks = x.view(rows // bh, bh, cols // bw, bw)
    low, high = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    scale = _with_eps(_symmetric_scale(low, high, E4M3_MAX), torch.finfo(x.dtype).eps)
    codes = (blocks.float() / scale.float()[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    return scale, codes.to(torch.float8_e4m3fn).view(rows, cols)


def _int8_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    scale = _with_eps(_symmetric_scale(low, high, 127.5), torch.finfo(x.dtype).eps)
    codes = torch.round((x.float() / scale.float()).clamp(-128.0, 127.0)).to(torch.int8)
    return scale, codes


def _nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    groups = x.view(rows, cols // _NVFP4_GROUP, _NVFP4_GROUP)
    local = _symmetric_scale(groups.amin(dim=-1), groups.amax(dim=-1), 6.0)
    scale = (global_scale * local).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    scale = _with_eps(scale, _E4M3_EPS).to(x.dtype).float()  # stored in the weight's dtype first
    q = (groups.float() / (scale / global_scale)[..., None]).clamp(-6.0, 6.0)
    a = q.abs()
    # E2M1 magnitude index 0..7 (0, .5, 1, 1.5, 2, 3, 4, 6): the number of the library's rounding
    # thresholds passed; '>' and '>=' alternate so that ties go to the even code.
    index = ((a > 0.25).to(torch.uint8) + (a >= 0.75).to(torch.uint8) + (a > 1.25).to(torch.uint8)
             + (a >= 1.75).to(torch.uint8) + (a > 2.5).to(torch.uint8) + (a >= 3.5).to(torch.uint8)
             + (a > 5.0).to(torch.uint8))
    codes = (index | ((q < 0).to(torch.uint8) << 3)).view(rows, cols // 2, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)
    return scale.to(torch.float8_e4m3fn), packed


def _nvfp4_global_scale(*members: torch.Tensor) -> torch.Tensor:
    from compressed_tensors.quantization.utils import generate_gparam

    amax = torch.stack([torch.maximum(m.amin().abs(), m.amax().abs()) for m in members]).amax()
    return generate_gparam(-amax.reshape(1), amax.reshape(1))


_KERNELS = {fn.__name__: CompiledOrEager(fn)
            for fn in (_fp8_channel, _fp8_blocks, _int8_channel, _nvfp4, _nvfp4_global_scale)}


def _run(name: str, *args: Any, compiled: bool) -> Any:
    kernel = _KERNELS[name]
    return kernel(*args) if compiled else kernel.fn(*args)


def nvfp4_global_scale(members: list[torch.Tensor], compiled: bool = True) -> torch.Tensor:
    """The library's NVFP4 global scale (``generate_gparam``) of the largest magnitude over
    ``members`` (a fused set), reductions included in one compiled function."""
    kernel = _KERNELS["_nvfp4_global_scale"]
    return kernel(*members) if compiled else kernel.fn(*members)


def quantize(w: torch.Tensor, scheme: Any, global_scale: torch.Tensor | None,
             compiled: bool = True) -> dict[str, torch.Tensor] | None:
    """The library's quantized tensors of the 2-D weight ``w`` (``fp32`` rounding), or None where
    this module does not cover the scheme or shape."""
    args = scheme.weights
    fmt = scheme.format
    strategy = str(getattr(args.strategy, "value", args.strategy))
    kind = str(getattr(args.type, "value", args.type))
    if w.dim() != 2 or not args.symmetric or w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    if args.scale_dtype is not None and not (fmt == "nvfp4-pack-quantized" and args.scale_dtype == torch.float8_e4m3fn):
        return None
    w = w.contiguous()
    if fmt == "float-quantized" and kind == "float" and args.num_bits == 8:
        if strategy == "channel":
            scale, codes = _run("_fp8_channel", w, compiled=compiled)
        elif strategy == "block" and not (w.shape[0] % args.block_structure[0] or w.shape[1] % args.block_structure[1]):
            scale, codes = _run("_fp8_blocks", w, *args.block_structure, compiled=compiled)
        else:
            return None
        return {"weight_scale": scale, "weight": codes}
    if fmt == "int-quantized" and kind == "int" and args.num_bits == 8 and strategy == "channel":
        scale, codes = _run("_int8_channel", w, compiled=compiled)
        return {"weight_scale": scale, "weight": codes}
    if (fmt == "nvfp4-pack-quantized" and args.group_size == _NVFP4_GROUP and strategy == "tensor_group"
            and global_scale is not None and w.shape[1] % _NVFP4_GROUP == 0):
        scale, packed = _run("_nvfp4", w, global_scale, compiled=compiled)
        return {"weight_global_scale": global_scale, "weight_packed": packed, "weight_scale": scale}
    return None
