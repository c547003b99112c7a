"""A custom converter: cast every floating-point tensor to one dtype (e.g. an fp32 or fp16
checkpoint to bf16) on its way into Megatron or into a new HF checkpoint.

    PYTHONPATH=examples/converters convert-checkpoint hf SRC DST --converter cast_dtype:make:dtype=bfloat16
    PYTHONPATH=examples/converters convert-checkpoint --load_platform huggingface --save_platform mcore \\
        --load_ckpt_path SRC --save_ckpt_path DST --converter cast_dtype:make:dtype=bfloat16

or from Python: ``convert_checkpoint(SRC, DST, CastDtype(torch.bfloat16))``.
"""
from __future__ import annotations

import torch


class CastDtype:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def get_dependencies(self, weight_name: str) -> set[str]:
        return set()  # every tensor converts on its own

    def validate(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.process(tensors)  # .to() works on meta tensors too

    def process(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.to(self.dtype) if t.dtype.is_floating_point and t.dtype.itemsize > 1 else t
                for name, t in tensors.items()}

    def update_config(self, config):
        return config  # the quantization config (if any) is unchanged

    def update_model_config(self, config: dict) -> dict:
        config["torch_dtype"] = str(self.dtype).replace("torch.", "")
        return config


def make(model_dir: str, dtype: str = "bfloat16") -> CastDtype:
    """Factory for ``--converter cast_dtype:make:dtype=...``; gets the source directory first."""
    return CastDtype(getattr(torch, dtype))
