"""GPT-OSS's MXFP4 experts (``quant_method: mxfp4``) to full precision.

``<name>_blocks`` (uint8 ``[..., out, in/32, 16]``: 32 FP4 E2M1 codes per block along ``in``, two
per byte, low nibble first) and ``<name>_scales`` (uint8 E8M0 ``[..., out, in/32]``, one per block)
become ``<name>`` = ``E2M1[code] * 2^(scale - 127)``, formed in fp32 (exact: every such value is a
float32), cast to ``dtype`` and transposed to HF's input-major ``[..., in, out]`` (formats.md §7;
the same values and layout as transformers' ``integrations/mxfp4.convert_moe_packed_tensors``).
"""
from __future__ import annotations

import torch

from ..errors import ConversionError

BLOCKS, SCALES = "_blocks", "_scales"
# FP4 E2M1: sign bit 3, then exponent/mantissa codes 0..7
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_NAN = 255


class MXFP4Dequantizer:
    label = "mxfp4_dequantizer"

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype

    def get_dependencies(self, weight_name: str) -> set[str]:
        if weight_name.endswith(BLOCKS):
            return {weight_name[: -len(BLOCKS)] + SCALES}
        return set()

    def _pairs(self, tensors: dict[str, torch.Tensor]):
        for name in list(tensors):
            if name.endswith(BLOCKS):
                base = name[: -len(BLOCKS)]
                if base + SCALES not in tensors:
                    raise ConversionError(f"MXFP4 tensor {name} has no {base}{SCALES}")
                blocks, scales = tensors[name], tensors[base + SCALES]
                self._check(name, blocks, base + SCALES, scales)
                yield base, blocks, scales

    @staticmethod
    def _check(name: str, blocks: torch.Tensor, scale_name: str, scales: torch.Tensor) -> None:
        if blocks.dtype != torch.uint8 or blocks.dim() < 3 or blocks.shape[-1] != 16:
            raise ConversionError(f"{name} is {str(blocks.dtype).replace('torch.', '')} {list(blocks.shape)}; "
                                  "MXFP4 blocks are uint8 [..., out, in/32, 16]")
        if scales.dtype != torch.uint8 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
            raise ConversionError(f"{scale_name} is {str(scales.dtype).replace('torch.', '')} {list(scales.shape)}, "
                                  f"but {name} {list(blocks.shape)} needs uint8 {list(blocks.shape[:-1])}")

    @staticmethod
    def _shape(blocks: torch.Tensor) -> tuple[int, ...]:
        *lead, out, groups, _ = blocks.shape
        return (*lead, groups * 32, out)

    def validate(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for base, blocks, _ in list(self._pairs(tensors)):
            tensors[base] = torch.empty(self._shape(blocks), dtype=self.dtype, device="meta")
            del tensors[base + BLOCKS], tensors[base + SCALES]
        self._refuse_orphans(tensors)
        return tensors

    def process(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for base, blocks, scales in list(self._pairs(tensors)):
            if bool((scales == E8M0_NAN).any()):
                raise ConversionError(f"{base}{SCALES} holds the E8M0 NaN scale 255")
            tensors[base] = dequantize(blocks, scales, self.dtype)
            del tensors[base + BLOCKS], tensors[base + SCALES]
        self._refuse_orphans(tensors)
        return tensors

    @staticmethod
    def _refuse_orphans(tensors: dict[str, torch.Tensor]) -> None:
        for name in tensors:
            if name.endswith(SCALES) and name[: -len(SCALES)] + BLOCKS not in tensors:
                raise ConversionError(f"{name} has no MXFP4 blocks {name[: -len(SCALES)]}{BLOCKS} beside it")

    def update_config(self, config):
        return None  # every MXFP4 tensor is dequantized: the checkpoint is no longer quantized


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., out, in/32, 16]`` codes and ``[..., out, in/32]`` scales -> ``[..., in, out]`` values.

    One ``[out, in]`` matrix (an expert) at a time: the fp32 values of a whole gpt-oss-120b
    tensor would be 8.5 GB, its code indices more."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    *lead, out_dim, groups, _ = blocks.shape
    out = torch.empty(*lead, groups * 32, out_dim, dtype=dtype)
    flat_out = out.view(-1, groups * 32, out_dim)
    flat_blocks = blocks.reshape(-1, out_dim, groups, 16)
    flat_scales = scales.reshape(-1, out_dim, groups)
    for i in range(flat_blocks.shape[0]):
        b = flat_blocks[i]
        codes = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2).int()  # low nibble first
        values = torch.ldexp(lut[codes], (flat_scales[i].to(torch.int32) - 127).unsqueeze(-1).float())
        flat_out[i].copy_(values.flatten(-2).T)
    return out
