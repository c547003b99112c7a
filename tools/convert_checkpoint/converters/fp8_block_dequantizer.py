"""Block-scaled FP8 (DeepSeek's ``quant_method: fp8``) to full precision.

``weight`` (float8_e4m3fn ``[out, in]``) times ``weight_scale_inv`` (fp32, one per block,
``[ceil(out/bh), ceil(in/bw)]``), formed in fp32 and cast to ``dtype``: the formula of
``formats.md`` §1, and the same arithmetic as compressed-tensors' ``FP8BlockDequantizer``. Ours
exists because the library's returns a non-contiguous tensor (which safetensors refuses) when a
dimension is not a multiple of the block, and because it checks the scale grid's shape.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import ConversionError
from .names import matches_any, split_param

SCALE_SUFFIX = "weight_scale_inv"


class FP8BlockDequantizer:
    label = "fp8_block_dequantizer"

    def __init__(self, quantized_modules: Iterable[str], targets: Iterable[str] = (), ignore: Iterable[str] = (),
                 block_size: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16):
        self.quantized_modules = frozenset(quantized_modules)  # modules that have a weight_scale_inv
        self.targets = tuple(targets)  # names or re: patterns; empty = every quantized module
        self.ignore = tuple(ignore)
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.dtype = dtype
        self.source_config: dict | None = None  # the checkpoint's quantization_config

    @classmethod
    def for_checkpoint(cls, tensor_names: Iterable[str], quantization_config: dict | None = None,
                       **options) -> FP8BlockDequantizer:
        """Targets every module with a ``weight_scale_inv``; the block size comes from the
        config's ``weight_block_size`` unless given."""
        modules = {split_param(n)[0] for n in tensor_names if split_param(n)[1] == SCALE_SUFFIX}
        if not modules:
            raise ConversionError("fp8_block_dequantizer: the checkpoint has no weight_scale_inv tensors (it is not block FP8)")
        if "block_size" not in options:
            block = (quantization_config or {}).get("weight_block_size") or (128, 128)
            options["block_size"] = tuple(block)
        converter = cls(modules, **options)
        converter.source_config = dict(quantization_config) if quantization_config else None
        return converter

    def _targeted(self, module: str) -> bool:
        if module not in self.quantized_modules or matches_any(module, self.ignore):
            return False
        return not self.targets or "Linear" in self.targets or matches_any(module, self.targets)

    def get_dependencies(self, weight_name: str) -> set[str]:
        module, param = split_param(weight_name)
        if param == "weight" and self._targeted(module):
            return {f"{module}.{SCALE_SUFFIX}"}
        return set()

    def _pairs(self, tensors: dict[str, torch.Tensor]):
        for name in list(tensors):
            module, param = split_param(name)
            if param == "weight" and self._targeted(module):
                scale_name = f"{module}.{SCALE_SUFFIX}"
                if scale_name not in tensors:
                    raise ConversionError(f"FP8 weight {name} has no {scale_name}")
                codes, scale = tensors[name], tensors[scale_name]
                self._check(name, codes, scale_name, scale)
                yield name, scale_name, codes, scale

    def _check(self, name: str, codes: torch.Tensor, scale_name: str, scale: torch.Tensor) -> None:
        if codes.dtype != torch.float8_e4m3fn or codes.dim() != 2:
            raise ConversionError(f"{name} is {str(codes.dtype).replace('torch.', '')} {list(codes.shape)}; "
                                  "block FP8 weights are 2-D float8_e4m3fn")
        bh, bw = self.block_size
        want = (-(-codes.shape[0] // bh), -(-codes.shape[1] // bw))
        if tuple(scale.shape) != want:
            raise ConversionError(f"{scale_name} has shape {list(scale.shape)}, but {name} {list(codes.shape)} "
                                  f"in {bh}x{bw} blocks needs {list(want)}")

    def validate(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, scale_name, codes, _ in list(self._pairs(tensors)):
            tensors[name] = torch.empty(codes.shape, dtype=self.dtype, device="meta")
            del tensors[scale_name]
        self._refuse_orphans(tensors)
        return tensors

    def process(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, scale_name, codes, scale in list(self._pairs(tensors)):
            tensors[name] = dequantize(codes, scale, self.block_size, self.dtype)
            del tensors[scale_name]
        self._refuse_orphans(tensors)
        return tensors

    def _refuse_orphans(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in tensors:
            module, param = split_param(name)
            if param == SCALE_SUFFIX and self._targeted(module):
                raise ConversionError(f"{name} has no FP8 weight {module}.weight beside it")

    def update_config(self, config):
        """None (unquantized) once every FP8 module is dequantized; with some left in FP8 by
        ``targets``/``ignore``, the checkpoint's FP8 config stays, as those tensors still need it."""
        if all(self._targeted(m) for m in self.quantized_modules):
            return None
        return self.source_config if self.source_config is not None else config


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` per block in fp32, then cast; edge blocks may be partial."""
    rows, cols = codes.shape
    bh, bw = block_size
    grid_rows, grid_cols = scale.shape
    values = torch.zeros(grid_rows * bh, grid_cols * bw, dtype=torch.float32)
    values[:rows, :cols] = codes
    values.view(grid_rows, bh, grid_cols, bw).mul_(scale.float()[:, None, :, None])
    return values[:rows, :cols].to(dtype).contiguous()
