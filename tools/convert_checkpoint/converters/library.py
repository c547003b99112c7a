"""compressed-tensors' own converters, built for our pipeline.

The conversions themselves are the library's (``compressed_tensors.entrypoints.convert``); the
subclasses here only change how they are constructed or what they report:

* ``CompressedTensorsDequantizer`` is built from a ``quantization_config`` dict (the source's, or
  the one an earlier converter of the chain produced), not by re-reading a model directory;
* ``ModelOptNvfp4Converter`` gets its dependencies from the checkpoint's tensor names: the
  library matches ``targets`` against module names, so with the usual ``["Linear"]`` a weight
  in one shard and its scales in another would never meet;
* ``AutoAWQConverter.validate`` reports the real output shapes (the library returns empty
  placeholders, and a chained dequantizer or our planner needs the shapes); its config is read
  from config.json directly, without ``AutoConfig`` (no remote code for DeepSeek-style models).

The library is imported here only, so the rest of the package works without it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.config import CompressionFormat
from compressed_tensors.entrypoints.convert import (
    AutoAWQConverter,
    CompressedTensorsDequantizer,
    ModelOptNvfp4Converter,
)
from compressed_tensors.quantization import QuantizationConfig

from ..errors import ConversionError
from .names import matches_any, split_param


class CTDequantizer(CompressedTensorsDequantizer):
    label = "ct_dequantizer"

    def __init__(self, quantization_config: dict | None, ignore: Iterable[str] = (), dtype: torch.dtype = torch.bfloat16,
                 tensor_names: Iterable[str] | None = None):
        # The library's __init__ reads config.json from a model directory; the rest is its own.
        if not quantization_config or quantization_config.get("quant_method") != "compressed-tensors":
            method = (quantization_config or {}).get("quant_method")
            raise ConversionError(
                f"ct_dequantizer: the quantization_config is {'absent' if method is None else repr(method)}, "
                "not compressed-tensors (put a converter to compressed-tensors before it, e.g. autoawq or modelopt_nvfp4)")
        data = {k: v for k, v in quantization_config.items() if k != "version"}
        try:
            self.quant_config = QuantizationConfig.model_validate(data)
        except Exception as e:
            raise ConversionError(f"ct_dequantizer: quantization_config is not a valid compressed-tensors config: "
                                  f"{_first_validation_error(e)}") from None
        self.dtype = dtype
        self.quant_config.ignore = list(self.quant_config.ignore or []) + list(ignore)
        for group, scheme in self.quant_config.config_groups.items():
            try:
                scheme.format = CompressionFormat(infer_module_format(torch.nn.Linear, scheme))
            except Exception as e:
                raise ConversionError(f"ct_dequantizer: config group {group}: unknown or unsupported format ({e})") from None
        if tensor_names is not None:
            self.quant_config.ignore += sorted(self._unquantized(set(tensor_names)))

    _ACTIVATION_QPARAMS = frozenset({"input_scale", "input_global_scale", "input_zero_point",
                                     "output_scale", "output_global_scale", "output_zero_point"})

    def process(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The library's decompression; activation quantization parameters (W4A4's input
        scales) mean nothing to full-precision weights and are dropped with the format."""
        out = super().process(tensors)
        return {n: t for n, t in out.items() if split_param(n)[1] not in self._ACTIVATION_QPARAMS
                or matches_any(split_param(n)[0], self.quant_config.ignore)}

    def _unquantized(self, names: set[str]) -> set[str]:
        """Modules whose weight has none of its format's scales. Where the format keeps the name
        ``weight`` (float-/int-quantized), the library would take every ``X.weight``, an
        embedding's too, for a quantized one; they are ignored instead."""
        from compressed_tensors.compressors import BaseCompressor

        found = set()
        for scheme in self.quant_config.config_groups.values():
            params = BaseCompressor.get_value_from_registry(scheme.format).compression_param_names(scheme)
            for name in names:
                module, param = split_param(name)
                if param == params[0] and not any(f"{module}.{p}" in names for p in params[1:]):
                    found.add(module)
        return found


class ModelOptToCompressedTensors(ModelOptNvfp4Converter):
    """ModelOpt NVFP4 (weight, weight_scale, weight_scale_2, input_scale) to compressed-tensors
    NVFP4 (weight_packed, weight_scale, weight_global_scale = 1/weight_scale_2,
    input_global_scale = 1/input_scale)."""

    label = "modelopt_nvfp4"
    _SCALES = ("input_scale", "weight_scale", "weight_scale_2")

    def __init__(self, tensor_names: Iterable[str], ignore: Iterable[str] = (), targets: Iterable[str] = ("Linear",)):
        super().__init__(ignore=list(ignore), targets=list(targets))
        names = set(tensor_names)
        self._names = frozenset(names)
        self._quantized = frozenset(split_param(n)[0] for n in names if n.endswith(".weight_scale_2"))
        if not self._quantized:
            raise ConversionError("modelopt_nvfp4: the checkpoint has no weight_scale_2 tensors (it is not ModelOpt NVFP4)")

    @classmethod
    def for_checkpoint(cls, tensor_names: Iterable[str], quantization_config: dict | None, hf_quant_config: dict | None,
                       **options) -> ModelOptToCompressedTensors:
        qc = quantization_config or {}
        algo = qc.get("quant_algo") or ((hf_quant_config or {}).get("quantization") or {}).get("quant_algo")
        if algo is not None and algo != "NVFP4":
            raise ConversionError(f"modelopt_nvfp4: quant_algo {algo!r} is not supported (only NVFP4)")
        if "ignore" not in options:
            excluded = qc.get("ignore") or ((hf_quant_config or {}).get("quantization") or {}).get("exclude_modules") or []
            # ModelOpt writes fnmatch-style names (lm_head, model.layers.*.mlp.gate)
            options["ignore"] = [p if p.startswith("re:") or "*" not in p else "re:" + re.escape(p).replace(r"\*", ".*") + "$"
                                 for p in excluded]
        return cls(tensor_names, **options)

    def _targeted(self, module: str) -> bool:
        if module not in self._quantized or matches_any(module, self.ignore):
            return False
        return "Linear" in self.targets or not self.targets or matches_any(module, self.targets)

    def get_dependencies(self, weight_name: str) -> set[str]:
        module, param = split_param(weight_name)
        if param != "weight" or not self._targeted(module):
            return set()
        deps = {f"{module}.{s}" for s in self._SCALES}
        for kv in ("k_scale", "v_scale"):
            if self.kv_cache_scheme is not None and f"{module}.{kv}" in self._names:
                deps.add(f"{module}.{kv}")
        return {d for d in deps if d in self._names or not d.endswith("input_scale")}

    def validate(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, t in tensors.items():
            module, param = split_param(name)
            if param != "weight" or not self._targeted(module):
                continue
            scale = tensors.get(f"{module}.weight_scale")
            if scale is None:
                raise ConversionError(f"NVFP4 weight {name} has no {module}.weight_scale")
            if f"{module}.weight_scale_2" not in tensors:
                raise ConversionError(f"NVFP4 weight {name} has no {module}.weight_scale_2")
            if t.dtype != torch.uint8 or t.dim() != 2:
                raise ConversionError(f"{name} is {str(t.dtype).replace('torch.', '')} {list(t.shape)}; "
                                      "ModelOpt NVFP4 weights are 2-D uint8 (two FP4 codes per byte)")
            want = [t.shape[0], t.shape[1] * 2 // 16]
            if list(scale.shape) != want or scale.dtype != torch.float8_e4m3fn:
                raise ConversionError(f"{module}.weight_scale is {str(scale.dtype).replace('torch.', '')} {list(scale.shape)}, "
                                      f"but {name} {list(t.shape)} needs float8_e4m3fn {want} (one scale per 16 values)")
        return super().validate(tensors)


class AwqToCompressedTensors(AutoAWQConverter):
    """AutoAWQ GEMM (qweight, qzeros, scales) to compressed-tensors W4A16 pack-quantized."""

    label = "autoawq"

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, targets: Iterable[str] = ("Linear",),
                        trust_remote_code: bool = False) -> AwqToCompressedTensors:
        import json
        import os

        path = os.path.join(model_name_or_path, "config.json")
        with open(path) as f:
            qc = json.load(f).get("quantization_config")
        return cls.for_config(qc, targets=targets, where=path)

    @classmethod
    def for_config(cls, quantization_config: dict | None, where: str = "config.json", **options) -> AwqToCompressedTensors:
        qc = quantization_config or {}
        if qc.get("quant_method") != "awq":
            raise ConversionError(f"autoawq: {where} quantization_config quant_method is {qc.get('quant_method')!r}, not 'awq'")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or int(qc.get("bits", 4)) != 4:
            raise ConversionError(f"autoawq: only 4-bit GEMM checkpoints are supported, {where} says "
                                  f"bits={qc.get('bits')} version={qc.get('version')!r}")
        return cls.from_autoawq_config(qc, **options)

    def validate(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pack = 32 // self.bits
        for name, q in tensors.items():
            module, param = split_param(name)
            if param != "qweight" or not self._is_targeted(module):
                continue
            scales = tensors.get(f"{module}.scales")
            zeros = tensors.get(f"{module}.qzeros")
            if scales is None or (self.zero_point and zeros is None):
                raise ConversionError(f"AWQ weight {name} has no {module}.{'scales' if scales is None else 'qzeros'}")
            if q.dtype != torch.int32 or q.dim() != 2:
                raise ConversionError(f"{name} is {str(q.dtype).replace('torch.', '')} {list(q.shape)}; AWQ qweight is 2-D int32")
            rows, out = q.shape[0], q.shape[1] * pack
            groups = rows // self.group_size
            if rows % self.group_size:
                raise ConversionError(f"{name}: {rows} input features are not a multiple of group_size {self.group_size}")
            if list(scales.shape) != [groups, out]:
                raise ConversionError(f"{module}.scales has shape {list(scales.shape)}, but {name} {list(q.shape)} with "
                                      f"group_size {self.group_size} needs {[groups, out]}")
            if zeros is not None and list(zeros.shape) != [groups, out // pack]:
                raise ConversionError(f"{module}.qzeros has shape {list(zeros.shape)}, but {name} needs {[groups, out // pack]}")
        shapes = {}
        for name, q in tensors.items():
            module, param = split_param(name)
            if param == "qweight" and self._is_targeted(module):
                rows, out = q.shape[0], q.shape[1] * pack
                shapes[module] = {
                    "weight_packed": ((out, -(-rows // pack)), torch.int32),
                    "weight_shape": ((2,), torch.int64),
                    "weight_scale": ((out, rows // self.group_size), tensors[f"{module}.scales"].dtype),
                    "weight_zero_point": ((-(-out // pack), rows // self.group_size), torch.int32),
                }
        out_tensors = super().validate(tensors)  # the library's own checks and names
        for name in list(out_tensors):
            module, param = split_param(name)
            if module in shapes and param in shapes[module]:
                shape, dtype = shapes[module][param]
                out_tensors[name] = torch.empty(shape, dtype=dtype, device="meta")
        return out_tensors


def _first_validation_error(e: Exception) -> str:
    """pydantic's first complaint as one line: where, what, and the value given."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()) if "(" not in str(p))
            message = str(first.get("msg", "")).split(". ")[0]
            given = first.get("input")
            return f"{where}: {message[:160]} (got {given!r})" if not isinstance(given, dict) else f"{where}: {message[:160]}"
        except Exception:
            pass
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
