"""``--converter`` specs: built-in converters with options, or a custom ``module:factory``.

Spec syntax (one ``--converter`` per converter; they run in the order given):

* ``NAME`` or ``NAME:key=value,key=value`` for a built-in (a list option repeats its key:
  ``ignore=lm_head,ignore=re:.*mlp.gate$``), or ``NAME:{json}`` for anything a comma would break;
* ``package.module:factory`` or ``package.module:factory:key=value,...`` for your own: the
  factory is called as ``factory(model_dir, **options)`` and returns a Converter or a list.

Each built-in is made for the checkpoint in hand: it reads the ``quantization_config`` as the
previous converters of the chain leave it, and the checkpoint's tensor names.
"""
from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConversionError
from ..registry import Registry

if TYPE_CHECKING:  # torch and the protocol load on use, so `--help` (which lists the built-ins) stays fast
    import torch

    from .protocol import ConverterChain

# dtype option spellings -> torch dtype attribute
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "half": "float16", "float32": "float32", "fp32": "float32"}
_LIST_OPTIONS = {"ignore", "targets"}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a built-in needs to know about the source checkpoint."""

    root: str
    config: dict  # config.json
    tensor_names: frozenset[str]

    def extra_json(self, name: str) -> dict | None:
        path = os.path.join(self.root, name)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)


@dataclass(frozen=True)
class ConverterSpec:
    text: str
    name: str  # a built-in name, or "module:attr" for a custom factory
    options: dict = field(default_factory=dict)

    @property
    def is_builtin(self) -> bool:
        return self.name in BUILTINS


def parse_spec(text: str) -> ConverterSpec:
    head, sep, rest = text.partition(":")
    if head in BUILTINS:
        return ConverterSpec(text, head, _parse_options(rest, text) if sep else {})
    if not sep or not rest:
        known = ", ".join(BUILTINS.names())
        raise ConversionError(f"--converter {text}: unknown converter (built-ins: {known}; or give package.module:factory)")
    attr, sep2, opts = rest.partition(":")
    if not attr.isidentifier():
        raise ConversionError(f"--converter {text}: {attr!r} is not a factory name (expected package.module:factory)")
    return ConverterSpec(text, f"{head}:{attr}", _parse_options(opts, text) if sep2 else {})


def _parse_options(text: str, spec: str) -> dict:
    text = text.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as e:
            raise ConversionError(f"--converter {spec}: options are not valid JSON ({e})") from None
        if not isinstance(parsed, dict):
            raise ConversionError(f"--converter {spec}: JSON options must be an object")
        return parsed
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConversionError(f"--converter {spec}: option {item!r} is not key=value")
        key = key.strip()
        if key in _LIST_OPTIONS:
            options.setdefault(key, []).append(value)
        elif key in options:
            raise ConversionError(f"--converter {spec}: option {key} given twice")
        else:
            options[key] = value
    return options


# --- option values -----------------------------------------------------------------------

def _dtype(value: Any, spec: str) -> torch.dtype:
    import torch

    if isinstance(value, torch.dtype):
        return value
    name = DTYPE_NAMES.get(str(value).replace("torch.", ""))
    if name is None:
        raise ConversionError(f"--converter {spec}: dtype {value!r} is not one of {', '.join(sorted(DTYPE_NAMES))}")
    return getattr(torch, name)


def _names(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _block(value: Any, spec: str) -> tuple[int, int]:
    parts = str(value).lower().replace("x", ",").strip("[]()").split(",") if not isinstance(value, (list, tuple)) else value
    try:
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConversionError(f"--converter {spec}: block_size {value!r} is not two integers (e.g. 128x128)") from None
    return h, w


def _take(options: dict, allowed: Iterable[str], spec: ConverterSpec) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConversionError(f"--converter {spec.text}: unknown option {unknown[0]} for {spec.name} "
                              f"(it takes: {', '.join(sorted(allowed))})")
    return dict(options)


# --- built-ins ---------------------------------------------------------------------------

Factory = Callable[[CheckpointInfo, "dict | None", ConverterSpec], list]
BUILTINS: Registry[Factory] = Registry("converter")


@BUILTINS.register("fp8_block_dequantizer", "block FP8 (weight + weight_scale_inv) -> dtype. Options: dtype, targets, ignore, block_size")
def _fp8_block(info: CheckpointInfo, qc: dict | None, spec: ConverterSpec) -> list:
    from .fp8_block_dequantizer import FP8BlockDequantizer

    o = _take(spec.options, ("targets", "ignore", "block_size", "dtype"), spec)
    kw: dict[str, Any] = {"targets": _names(o.get("targets", ())), "ignore": _names(o.get("ignore", ())),
                          "dtype": _dtype(o.get("dtype", "bfloat16"), spec.text)}
    if "block_size" in o:
        kw["block_size"] = _block(o["block_size"], spec.text)
    return [FP8BlockDequantizer.for_checkpoint(info.tensor_names, qc, **kw)]


@BUILTINS.register("mxfp4_dequantizer", "GPT-OSS MXFP4 experts (*_blocks + *_scales) -> dtype, input-major like HF's bf16. Options: dtype")
def _mxfp4(info: CheckpointInfo, qc: dict | None, spec: ConverterSpec) -> list:
    from .mxfp4_dequantizer import BLOCKS, MXFP4Dequantizer

    o = _take(spec.options, ("dtype",), spec)
    if not any(n.endswith(BLOCKS) for n in info.tensor_names):
        raise ConversionError("mxfp4_dequantizer: the checkpoint has no *_blocks tensors (it is not MXFP4)")
    return [MXFP4Dequantizer(dtype=_dtype(o.get("dtype", "bfloat16"), spec.text))]


@BUILTINS.register("ct_dequantizer", "any compressed-tensors format the library decompresses -> dtype. Options: dtype, ignore")
def _ct_dequant(info: CheckpointInfo, qc: dict | None, spec: ConverterSpec) -> list:
    from .library import CTDequantizer

    o = _take(spec.options, ("ignore", "dtype"), spec)
    return [CTDequantizer(qc, ignore=_names(o.get("ignore", ())), dtype=_dtype(o.get("dtype", "bfloat16"), spec.text),
                          tensor_names=info.tensor_names if qc is info.config.get("quantization_config") else None)]


@BUILTINS.register("modelopt_nvfp4", "ModelOpt NVFP4 -> compressed-tensors NVFP4 (still 4-bit). Options: ignore, targets")
def _modelopt(info: CheckpointInfo, qc: dict | None, spec: ConverterSpec) -> list:
    from .library import ModelOptToCompressedTensors

    o = _take(spec.options, ("ignore", "targets"), spec)
    kw = {k: _names(v) for k, v in o.items()}
    if qc is not None and qc.get("quant_method") not in (None, "modelopt"):
        raise ConversionError(f"modelopt_nvfp4: quantization_config quant_method is {qc.get('quant_method')!r}, not 'modelopt'")
    return [ModelOptToCompressedTensors.for_checkpoint(info.tensor_names, qc, info.extra_json("hf_quant_config.json"), **kw)]


@BUILTINS.register("autoawq", "AutoAWQ GEMM 4-bit -> compressed-tensors W4A16 pack-quantized (still 4-bit). Options: ignore, targets")
def _awq(info: CheckpointInfo, qc: dict | None, spec: ConverterSpec) -> list:
    from .library import AwqToCompressedTensors

    o = _take(spec.options, ("ignore", "targets"), spec)
    converter = AwqToCompressedTensors.for_config(qc, where=os.path.join(info.root, "config.json"),
                                                  targets=_names(o.get("targets", ("Linear",))))
    converter.ignore = list(converter.ignore) + _names(o.get("ignore", ()))
    return [converter]


@BUILTINS.register("dequantize", "any of the above formats -> dtype, chosen from quantization_config. "
                                 "Options: dtype, ignore, if_quantized (true: an unquantized checkpoint passes unchanged)")
def _dequantize(info: CheckpointInfo, qc: dict | None, spec: ConverterSpec) -> list:
    """Whatever the checkpoint holds, to full precision."""
    from .protocol import ConverterChain

    o = _take(spec.options, ("dtype", "ignore", "if_quantized"), spec)
    method = (qc or {}).get("quant_method")
    if method is None and str(o.pop("if_quantized", "false")).lower() in ("1", "true", "yes"):
        return []  # nothing to dequantize (LoongForge's --hf-dequantize-int4 on a full-precision checkpoint)
    o.pop("if_quantized", None)
    dequant = ConverterSpec(spec.text, "", o)
    if method == "fp8":
        return _fp8_block(info, qc, dequant)
    if method == "compressed-tensors":
        return _ct_dequant(info, qc, dequant)
    if method == "mxfp4":
        return _mxfp4(info, qc, dequant)
    first = {"modelopt": _modelopt, "awq": _awq}.get(method) if method is not None else None
    if first is None:
        raise ConversionError(f"dequantize: the checkpoint's quantization_config quant_method is {method!r}; "
                              "known: fp8, compressed-tensors, mxfp4, modelopt, awq")
    chain = first(info, qc, ConverterSpec(spec.text, "", {k: v for k, v in o.items() if k == "ignore"}))
    ct_config = ConverterChain.of(chain).quantization_config(qc)
    return chain + _ct_dequant(info, ct_config, ConverterSpec(spec.text, "", {k: v for k, v in o.items() if k == "dtype"}))


@BUILTINS.register("quantize", "full precision -> a quantized checkpoint, model-free (compressed-tensors, or Quark with "
                               "format=quark). Options: scheme or config, targets, ignore, rounding (fp32 or weight_dtype), "
                               "device, format, int4_layout (quark: quark or vllm)")
def _quantize(info: CheckpointInfo, qc: dict | None, spec: ConverterSpec) -> list:
    o = _take(spec.options, ("scheme", "config", "targets", "ignore", "rounding", "device", "format", "int4_layout"), spec)
    fmt = o.pop("format", "compressed-tensors")
    int4_layout = o.pop("int4_layout", None)
    if fmt == "quark":
        try:
            quantize_quark = importlib.import_module(f"{__package__}.quantize_quark")  # another module's
        except ImportError:
            raise ConversionError("quantize: --format quark is not available in this version") from None
        if "config" in o:
            raise ConversionError("quantize: --format quark takes --scheme, not --config")
        if str(o.get("rounding", "fp32")) != "fp32" or str(o.get("device", "cpu")) != "cpu":
            raise ConversionError("quantize: --format quark has its own rounding and runs on cpu "
                                  "(--rounding and --device are for compressed-tensors)")
        return list(quantize_quark.build(str(o.get("scheme")), _names(o.get("targets", ())), _names(o.get("ignore", ())),
                                         int4_layout=str(int4_layout or "quark")))
    if fmt != "compressed-tensors":
        raise ConversionError(f"quantize: format {fmt!r} is not compressed-tensors or quark")
    if int4_layout is not None:
        raise ConversionError("quantize: --int4_layout is for --format quark (int4_wo_128)")
    from .quantize_ct import build_quantizer

    return [build_quantizer(info.config, info.tensor_names, qc, scheme=o.get("scheme"), config=o.get("config"),
                            targets=_names(o.get("targets", ())), ignore=_names(o.get("ignore", ())),
                            rounding=str(o.get("rounding", "fp32")), device=str(o.get("device", "cpu")))]


def _custom(info: CheckpointInfo, spec: ConverterSpec) -> list:
    module_name, attr = spec.name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConversionError(f"--converter {spec.text}: cannot import {module_name} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConversionError(f"--converter {spec.text}: {module_name} has no callable {attr}")
    try:
        made = factory(info.root, **spec.options)
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"--converter {spec.text}: {attr}() failed: {type(e).__name__}: {e}") from None
    return list(made) if isinstance(made, (list, tuple)) else [made]


def build_chain(info: CheckpointInfo, converters: Iterable[Any]) -> ConverterChain | None:
    """Converters from specs (strings) and/or objects, in order; each built-in sees the
    ``quantization_config`` the converters before it leave. None when the built-ins found
    nothing to do (``dequantize:if_quantized=true`` on a full-precision checkpoint)."""
    from .protocol import ConverterChain, check_converter, converter_label

    made: list[Any] = []
    labels: list[str] = []
    qc = info.config.get("quantization_config")
    for item in converters:
        if isinstance(item, str):
            spec = parse_spec(item)
            new = BUILTINS.get(spec.name)(info, qc, spec) if spec.is_builtin else _custom(info, spec)
            new_labels = [spec.text if len(new) == 1 else f"{spec.text}[{i}]" for i in range(len(new))]
        else:
            new, new_labels = [item], [converter_label(item)]
        for c, label in zip(new, new_labels):
            check_converter(c, label)
        if not new:
            continue
        made += new
        labels += new_labels
        qc = ConverterChain.of(new, new_labels).quantization_config(qc)
    return ConverterChain.of(made, labels) if made else None
