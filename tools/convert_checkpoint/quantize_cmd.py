"""``convert-checkpoint quantize SRC DST --scheme NAME``: model-free HF -> HF quantization.

The quantizer is the built-in converter ``quantize`` (converters/quantize_ct.py, or Quark's with
``--format quark``) run through the HF -> HF pipeline after any ``--converter`` pre-stages, so it
gets the executor's workers, memory budget, manifest, resume, report and torchrun sharing.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .errors import ConversionError
from .options import ConvertOptions, _add_runtime_flags, _adder, _check_runtime, converter_help, one_line_parser

FORMATS = ("compressed-tensors", "quark")


def read_config(text: str) -> dict:
    """``--config``: inline JSON, or a JSON/YAML file (config_groups and ignore, as llm-compressor's ``config=``)."""
    if os.path.isfile(text):
        with open(text) as f:
            body = f.read()
        if text.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(body)
        else:
            data = json.loads(body)
    else:
        try:
            data = json.loads(text)
        except ValueError:
            raise ConversionError(f"--config {text}: neither a file nor valid JSON") from None
    if not isinstance(data, dict):
        raise ConversionError(f"--config {text}: expected an object with config_groups")
    return data


def parse_quantize_options(argv: list[str]) -> ConvertOptions:
    p = one_line_parser("convert-checkpoint quantize",
                        "Quantize a HuggingFace safetensors checkpoint file by file, without loading the model "
                        "(compressed-tensors formats that vLLM loads, as llm-compressor's model_free_ptq).")
    p.add_argument("model_stub", help="source checkpoint directory (full precision, or quantized with a --converter pre-stage)")
    p.add_argument("save_directory", help="target directory (must be empty unless --overwrite or --resume)")
    p.add_argument("--scheme", help="FP8_DYNAMIC, FP8_BLOCK, W8A8, W8A16, W4A16, W4A16_ASYM, NVFP4A16, MXFP4A16, MXFP4, MXFP8A16")
    p.add_argument("--config", help="several schemes by target patterns: JSON, or a .json/.yaml file with config_groups")
    p.add_argument("--targets", action="append", default=[], metavar="PAT",
                   help="modules to quantize: names or re: patterns (default: every linear weight but the defaults kept dense)")
    p.add_argument("--ignore", action="append", default=[], metavar="PAT", help="modules not to quantize: names or re: patterns")
    p.add_argument("--format", choices=FORMATS, default="compressed-tensors", help="output format (default compressed-tensors)")
    p.add_argument("--converter", action="append", default=[], metavar="SPEC",
                   help="pre-stage run first (e.g. dequantize). " + converter_help())
    p.add_argument("--device", default="cpu",
                   help="where the quantization math runs: cpu (default), cuda (every GPU), cuda:N, or cuda:N,M "
                        "(files spread over the GPUs by estimated memory)")
    p.add_argument("--int4_layout", choices=("quark", "vllm"),
                   help="--format quark int4_wo_128: quark (amd-quark's bytes, default) or vllm (the layout vLLM's Quark "
                        "loader reads: AWQ nibble order, scale transposed)")
    p.add_argument("--rounding", choices=("fp32", "weight_dtype"), default="fp32",
                   help="fp32: one rounding in fp32 (llm-compressor on CUDA, default); weight_dtype: quotient in the "
                        "weight's dtype (llm-compressor on CPU)")
    _add_runtime_flags(_adder(p))
    ns = p.parse_args(argv)
    _check_runtime(ns)
    if (ns.scheme is None) == (ns.config is None):
        raise ConversionError("give exactly one of --scheme and --config")
    config = read_config(ns.config) if ns.config is not None else None
    from .converters.quantize_ct import quantize_spec

    spec = quantize_spec(ns.scheme, config, ns.targets, ns.ignore, ns.rounding, ns.device, ns.format, ns.int4_layout)
    return ConvertOptions("huggingface", "huggingface", ns.model_stub, ns.save_directory,
                          converters=(*ns.converter, spec), device=ns.device,
                          max_workers=ns.max_workers, max_memory=ns.max_memory, world_size=ns.world_size, rank=ns.rank,
                          overwrite=ns.overwrite, resume=ns.resume, strict_values=ns.strict_values, dry_run=ns.dry_run,
                          verbose=ns.verbose, progress=not ns.no_progress)


def not_quantized_lines(plan: Any) -> list[str]:
    converted = getattr(plan.source, "converted", None)
    if converted is None:
        return []
    return [line for c in converted.chain.converters if callable(getattr(c, "describe", None)) for line in c.describe()]
