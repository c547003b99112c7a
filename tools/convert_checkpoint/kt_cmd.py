"""``convert-checkpoint kt``: KTransformers CPU experts with kt-kernel's ``convert_cpu_weights.py``
flags (same meanings), written by the ``kt_cpu`` target through the usual pipeline and executor."""
from __future__ import annotations

import json
import os

from .errors import ConversionError
from .options import ConvertOptions, _add_runtime_flags, _adder, _check_runtime, converter_help, one_line_parser
from .requests import KtRequest

INPUT_TYPES = ("bf16", "fp16", "fp8", "awq")
QUANT_METHODS = ("int4", "int8", "awq", "moe_int4", "moe_int8")  # kt-kernel's choices; we write int4 and int8


def _quant_method(name: str) -> str:
    if name in ("moe_int4", "moe_int8"):
        raise ConversionError(f"--quant-method {name}: kt-kernel's generic moe_kernel backend uses another layout, "
                              "not written here; use int4 or int8 (AMXINT4/AMXINT8)")
    if name == "awq":
        raise ConversionError("--quant-method awq: kt-kernel's legacy AWQ column-major format is not written here; "
                              "AWQ input (--input-type awq) is dequantized and written as int4 or int8")
    return name


def source_quant_method(path: str) -> str | None:
    """config.json's quant_method of an HF source (None: unquantized or unreadable; the source
    endpoint reports those)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    return qc.get("quant_method") if isinstance(qc, dict) else None


def parse_kt_options(argv: list[str]) -> ConvertOptions:
    p = one_line_parser("convert-checkpoint kt",
                        "Write KTransformers CPU experts (kt-kernel AMXINT4/AMXINT8, NUMA parts) from a HuggingFace "
                        "or Megatron-Core checkpoint, as kt-kernel's convert_cpu_weights.py does, on CPU.")
    p.add_argument("--input-path", "-i", "--load_ckpt_path", "--load-ckpt-path", dest="input_path", required=True,
                   help="source checkpoint directory (HF safetensors, or Megatron with --load_platform mcore)")
    p.add_argument("--input-type", dest="input_type", choices=INPUT_TYPES,
                   help="what the experts are (checked; default: as the checkpoint says). fp16 is cast to bf16, fp8 "
                        "blocks dequantized to bf16 as kt-kernel does; awq is dequantized by the pre-stage")
    p.add_argument("--output", "-o", "--save_ckpt_path", "--save-ckpt-path", dest="output", required=True,
                   help="output directory (must be empty unless --overwrite or --resume)")
    p.add_argument("--quant-method", dest="quant_method", choices=QUANT_METHODS, default="int4",
                   help="int4 (AMXINT4, default) or int8 (AMXINT8)")
    p.add_argument("--threadpool-count", dest="threadpool_count", type=int, default=2,
                   help="NUMA parts the expert intermediate dimension is split into (default 2); the server's "
                        "--kt-threadpool-count must be the same")
    p.add_argument("--cpuinfer-threads", dest="cpuinfer_threads", type=int,
                   help="threads of the math in a single process (speed only; default: torch's)")
    p.add_argument("--no-merge-safetensor", dest="no_merge", action="store_true",
                   help="write kt-kernel's raw _layer_L/_numa_p/*.kt files, no safetensors")
    p.add_argument("--resume-layer", dest="resume_layer", type=int, default=0,
                   help="kt-kernel's restart by layer; here use --resume, which resumes by file through the manifest")
    p.add_argument("--gpu", action="store_true", help="accepted for kt-kernel's command lines; everything runs on CPU")
    p.add_argument("--save-backward-weights", dest="backward", action="store_true",
                   help="kt-kernel's SFT backward weights (ffn_*_bwd_exps): not written yet (refused)")
    p.add_argument("--ieee_scales", "--ieee-scales", dest="ieee_scales", action="store_true",
                   help="INT8 scale by a true division (amax/127) instead of kt-kernel's fast-math multiply")
    p.add_argument("--load_platform", "--load-platform", dest="load_platform", choices=("huggingface", "mcore"),
                   default="huggingface", help="source format (default huggingface)")
    p.add_argument("--converter", action="append", default=[], metavar="SPEC",
                   help="pre-stage on an HF source (default for a quantized non-FP8 source: dequantize). "
                        + converter_help())
    _add_runtime_flags(_adder(p))
    ns = p.parse_args(argv)
    _check_runtime(ns)
    method = _quant_method(ns.quant_method)
    if ns.resume_layer:
        raise ConversionError(f"--resume-layer {ns.resume_layer}: use --resume instead, which keeps every finished "
                              "file (verified through the manifest), merged or not")
    if ns.backward:
        raise ConversionError("--save-backward-weights: kt-kernel's SFT backward weights (ffn_*_bwd_exps) are not "
                              "written yet: their layout could not be checked against kt-kernel 0.7.2 here")
    if ns.threadpool_count < 1:
        raise ConversionError(f"--threadpool-count {ns.threadpool_count}: must be at least 1")
    if ns.cpuinfer_threads is not None:
        if ns.cpuinfer_threads < 1:
            raise ConversionError(f"--cpuinfer-threads {ns.cpuinfer_threads}: must be at least 1")
        import torch

        torch.set_num_threads(min(ns.cpuinfer_threads, os.cpu_count() or 1))
    converters = tuple(ns.converter)
    if ns.load_platform == "mcore" and (converters or ns.input_type in ("fp8", "awq")):
        raise ConversionError("--converter and --input-type fp8/awq apply to an HF source; a Megatron source is read "
                              "as it is stored")
    if ns.load_platform == "huggingface" and not converters:
        method_in = source_quant_method(ns.input_path)
        if ns.input_type == "awq" or (method_in is not None and method_in != "fp8"):
            converters = ("dequantize",)  # 4-bit and other formats: to bf16 on the way, in one pass
    kt = KtRequest(method, ns.threadpool_count, not ns.no_merge, ns.input_type, ns.ieee_scales)
    return ConvertOptions(ns.load_platform, "kt_cpu", ns.input_path, ns.output, converters=converters,
                          max_workers=ns.max_workers, max_memory=ns.max_memory, world_size=ns.world_size, rank=ns.rank,
                          overwrite=ns.overwrite, resume=ns.resume, strict_values=ns.strict_values, dry_run=ns.dry_run,
                          verbose=ns.verbose, progress=not ns.no_progress, kt=kt)
