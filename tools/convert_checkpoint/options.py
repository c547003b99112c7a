"""Command-line flags (the incumbent's names, underscore and dash spellings) -> frozen options."""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from . import compat
from .converters.registry import BUILTINS as CONVERTER_BUILTINS
from .converters.registry import DTYPE_NAMES
from .devices import math_device
from .endpoints import ENDPOINTS, target_format
from .errors import ConversionError
from .layout.pipeline import parse_layer_list
from .layout.placement import MTP_INNER_NAMES, TRANSFORMER_IMPLS
from .quant.fp8_block import QUANT_METHODS
from .requests import (
    Fp8Request,
    KtRequest,
    LayoutRequest,
    ModelChecks,
    ModelRequest,
    PlanRequest,
    RunOptions,
    TargetDir,
    VocabPadding,
)

CKPT_FORMATS = ("torch", "torch_dist")  # Megatron's --ckpt-format values this tool writes


@dataclass(frozen=True)
class ConvertOptions:
    load_platform: str
    save_platform: str
    load_ckpt_path: str
    save_ckpt_path: str
    config_file: str | None = None
    convert_file: str | None = None
    # None = not given: HF->MCore uses 1, MCore->HF reads the layout off the rank files.
    tensor_model_parallel_size: int | None = None
    pipeline_model_parallel_size: int | None = None
    virtual_stages: int | None = None
    num_layers_per_virtual_pipeline_stage: int | None = None
    custom_pipeline_layers: tuple[int, ...] | None = None
    make_vocab_size_divisible_by: int = 128
    pad_vocab_size_to: int | None = None
    add_embedding_padding: bool = True
    transformer_impl: str | None = None  # None = default (transformer_engine) / detect on load
    expert_parallel_size: int | None = None  # None: 1 (HF->MCore) / read off the files (MCore->HF)
    expert_tensor_parallel_size: int | None = None  # None: = TP
    moe_grouped_gemm: bool = False
    mtp_num_layers: int | None = None  # None: from config.json (num_nextn_predict_layers) / the checkpoint
    mtp_layer_name: str | None = None  # None: transformer_layer (HF->MCore) / detected (MCore->HF)
    # Vision-language models (LoongForge's single-pass VLM flags)
    encoder_tensor_model_parallel_size: int | None = None  # None: = TP
    vision_patch_convert_file: str | None = None
    enable_full_hetero_dp: bool = False
    ckpt_format: str = "torch"  # Megatron output: legacy rank files (torch) or torch_dist
    hf_config_path: str | None = None
    converters: tuple[str, ...] = ()  # --converter specs run on the HF source first (converters/registry.py)
    # Block-scaled FP8 (128x128 blocks, e4m3)
    convert_to_fp8: bool = False  # write the YAML's dtype: fp8 tensors as FP8 even from bf16
    quant_method: str = "pt"  # pt (pure torch) or te (TE's Float8BlockQuantizer)
    force_pow_2_scales: bool = True
    amax_epsilon: float = 0.0
    fp8_force_no_requant: bool = False
    device: str = "cpu"  # where quantization math runs
    max_shard_size: int = 5 * 1000**3
    max_workers: int | str = "auto"  # a count, or "auto" (workers.choose)
    io_threads: int | str = "auto"  # threads per worker moving bytes, or "auto" (workers.choose)
    max_memory: int | None = None  # None: half of the available memory (execute.default_memory_budget)
    world_size: int | None = None  # None: torchrun's WORLD_SIZE, else 1
    rank: int | None = None
    overwrite: bool = False
    resume: bool = False
    strict_values: bool = False
    dry_run: bool = False
    verbose: bool = False
    progress: bool = True
    # LoongForge's checking flags (--num_experts, --vocab_size, --torch_dtype): they must agree
    # with the model, and change nothing written.
    check_num_experts: int | None = None
    check_vocab_size: int | None = None
    check_torch_dtype: str | None = None
    kt: KtRequest = KtRequest()  # convert-checkpoint kt: the KTransformers target's settings

    def plan_request(self, converters: tuple[Any, ...] | None = None) -> PlanRequest:
        """What shapes the output. ``converters`` (objects, Python API) replaces the spec strings."""
        return PlanRequest(
            load_format=self.load_platform,
            save_format=target_format(self.save_platform, self.ckpt_format),
            source_path=self.load_ckpt_path,
            target=TargetDir(self.save_ckpt_path, self.overwrite, self.resume, self.dry_run),
            model=ModelRequest(self.config_file, self.convert_file, self.mtp_num_layers, self.vision_patch_convert_file),
            layout=LayoutRequest(
                tp=self.tensor_model_parallel_size, pp=self.pipeline_model_parallel_size,
                virtual_stages=self.virtual_stages, layers_per_virtual_stage=self.num_layers_per_virtual_pipeline_stage,
                custom_pipeline_layers=self.custom_pipeline_layers, transformer_impl=self.transformer_impl,
                ep=self.expert_parallel_size, etp=self.expert_tensor_parallel_size, grouped_gemm=self.moe_grouped_gemm,
                mtp_layer_name=self.mtp_layer_name, encoder_tp=self.encoder_tensor_model_parallel_size,
                full_hetero_dp=self.enable_full_hetero_dp),
            vocab=VocabPadding(self.make_vocab_size_divisible_by, self.pad_vocab_size_to, self.add_embedding_padding),
            fp8=Fp8Request(self.convert_to_fp8, self.quant_method, self.force_pow_2_scales, self.amax_epsilon,
                           self.fp8_force_no_requant, math_device(self.device)),
            converters=tuple(self.converters if converters is None else converters),
            max_shard_size=self.max_shard_size,
            hf_config_path=self.hf_config_path,
            checks=ModelChecks(self.check_num_experts, self.check_vocab_size, self.check_torch_dtype),
            kt=self.kt,
        )

    def run_options(self) -> RunOptions:
        """How the run goes (none of it changes the output)."""
        from .devices import parse_device  # counts GPUs (through NVML): only when a run starts

        return RunOptions(self.max_workers, self.max_memory, self.world_size, self.rank, self.overwrite, self.resume,
                          self.strict_values, self.dry_run, self.verbose, self.progress, gpus=parse_device(self.device, require=False),
                          io_threads=self.io_threads)


def _spellings(name: str) -> list[str]:
    under = "--" + name.replace("-", "_")
    dash = "--" + name.replace("_", "-")
    return [under] if under == dash else [under, dash]


def _str2bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?(,(cuda:)?\d+)*", text.strip()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or cuda:N,M,..., got {text!r}")
    return text.strip()


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB or 500MiB, got {text!r}")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text!r}")
    return value


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "positive")


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None
_non_negative = _int_at_least(0, "non-negative")


class _OneLineParser(argparse.ArgumentParser):
    """Flag errors as one line and exit code 2, like every other input error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def converter_help() -> str:
    return ("a converter, repeatable (applied in order): " + CONVERTER_BUILTINS.help_text()
            + ". Options as NAME:key=value,...; or package.module:factory for your own.")


Adder = Callable[..., None]


def _add_runtime_flags(add: Adder) -> None:
    """Flags that change how a run goes, not what it writes (main command and ``hf``)."""
    add("max_workers", type=_workers, default="auto",
        help="worker processes, each building one output file; auto (default): from the cores, the files, the memory "
             "budget and whether the conversion moves bytes or computes")
    add("io_threads", type=_workers, default="auto",
        help="threads in each worker copying the tensors that only move bytes (several streams per output file); "
             "auto (default): 8 streams over the workers")
    add("world_size", type=_positive, help="processes sharing the conversion (default: torchrun's WORLD_SIZE, else 1)")
    add("rank", type=_non_negative, help="this process's rank, with --world_size (default: torchrun's RANK)")
    add("max_memory", type=_size,
        help="bound on the output files held in memory at once across workers (e.g. 20GiB; default: half the available RAM)")
    add("overwrite", action="store_true", help="replace an existing, non-empty output directory")
    add("strict_values", action="store_true", help="NaN/Inf in a weight is an error (default: a warning)")
    add("resume", action="store_true",
        help="continue an interrupted conversion into the same directory: verified finished files are kept")
    add("dry_run", action="store_true", help="validate and print the plan; write nothing")
    add("prefetch", action="store_true",
        help="read the source files into the page cache from a child process while Python starts and plans (at most "
             "half the available memory); off by default: a cold import of torch waits behind it")
    add("no_prefetch", action="store_true", help="no read-ahead (the default; kept for existing scripts)")
    add("verbose", action="store_true", help="with --dry_run: print every tensor's recipe")
    add("no_progress", action="store_true", help="hide progress bars")


def _adder(p: argparse.ArgumentParser) -> Adder:
    def add(name: str, **kw: Any) -> None:
        p.add_argument(*_spellings(name), dest=name.replace("-", "_"), **kw)
    return add


def _check_runtime(ns: argparse.Namespace) -> None:
    if ns.resume and ns.overwrite:
        raise ConversionError("--resume and --overwrite contradict each other: --resume keeps finished files")


def one_line_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _OneLineParser(prog=prog, description=description)


def build_parser() -> argparse.ArgumentParser:
    p = one_line_parser(
        "convert-checkpoint",
        "Convert LLM checkpoints between HuggingFace safetensors and Megatron-Core legacy per-rank "
        "checkpoints, resharding over tensor and pipeline parallel ranks. "
        "`convert-checkpoint verify A B` compares two checkpoints; `convert-checkpoint hf SRC DST --converter SPEC` "
        "rewrites a quantized HF checkpoint (dequantize, ModelOpt NVFP4 / AutoAWQ to compressed-tensors); "
        "`convert-checkpoint quantize SRC DST --scheme S` quantizes; `convert-checkpoint kt -i SRC -o DST` writes "
        "KTransformers CPU experts (kt-kernel's flags) and `convert-checkpoint verify-kt DIR --source SRC` checks them.",
    )

    add = _adder(p)
    add("load_platform", choices=ENDPOINTS.names(), required=True, help="source format: " + ENDPOINTS.help_text())
    add("save_platform", choices=ENDPOINTS.names(), required=True, help="target format (as --load_platform)")
    add("load_ckpt_path", required=True, help="source checkpoint directory")
    add("save_ckpt_path", required=True, help="target directory (must be empty unless --overwrite)")
    add("config_file", help="architecture YAML (optional: derived from config.json or the checkpoint's args)")
    add("convert_file", help="family convert YAML (optional: picked by config.json model_type)")
    add("tensor_model_parallel_size", type=_positive, help="TP size (MCore->HF: read off the rank files)")
    add("pipeline_model_parallel_size", type=_positive, help="PP size (MCore->HF: read off the rank files)")
    add("num-virtual-stages-per-pipeline-rank", type=_positive, help="virtual pipeline chunks per rank (VPP)")
    add("num_layers_per_virtual_pipeline_stage", type=_positive, help="layers per virtual stage (alternative VPP spec)")
    add("custom_pipeline_layers", help="layers per virtual stage, e.g. 8,7,8,8 (pp x vpp entries)")
    add("make_vocab_size_divisible_by", type=_positive, default=128, help="pad vocab to a multiple of this x TP (default 128)")
    add("pad_vocab_size_to", type=_positive, help="explicit padded vocab size")
    add("add_embedding_padding", type=_str2bool, default=True, help="pad embedding rows (default true)")
    add("transformer_impl", choices=TRANSFORMER_IMPLS, help="MCore naming: transformer_engine (default) or local")
    add("expert_parallel_size", type=_positive, help="EP: routed experts split over this many ranks (MoE models)")
    add("expert_tensor_parallel_size", type=_positive, help="ETP: TP size of each expert (default: TP)")
    add("moe-grouped-gemm", action="store_true", help="TE grouped-linear expert names (linear_fc1.weight<i>)")
    add("mtp_num_layers", type=_non_negative,
        help="MTP layers (default: config.json num_nextn_predict_layers, or the checkpoint's); 0: the model has none")
    add("mtp_layer_name", choices=MTP_INNER_NAMES,
        help="name of an MTP layer's decoder layer: transformer_layer (megatron-core <= 0.16, default) or mtp_model_layer (0.19+)")
    add("ckpt_format", choices=CKPT_FORMATS, default="torch",
        help="Megatron-Core output format: torch (legacy per-rank files, default) or torch_dist (megatron-core's "
             "distributed checkpoint); a Megatron source's format is detected")
    add("hf_config_path", help="MCore->HF: reference HF dir whose config/tokenizer files are copied")
    add("converter", action="append", metavar="SPEC", help=converter_help() + " HF->MCore: run on the HF source first.")
    add("quantize", metavar="SCHEME",
        help="MCore->HF: write a quantized HF checkpoint in one pass (a `convert-checkpoint quantize` scheme, e.g. "
             "NVFP4A16); the same bytes as MCore->HF followed by `convert-checkpoint quantize`")
    add("ignore", action="append", metavar="PAT", help="with --quantize: modules not to quantize (names or re: patterns)")
    add("targets", action="append", metavar="PAT", help="with --quantize: modules to quantize (names or re: patterns)")
    add("format", choices=("compressed-tensors", "quark"), help="with --quantize: output format (default compressed-tensors)")
    add("rounding", choices=("fp32", "weight_dtype"), help="with --quantize: fp32 (default) or weight_dtype rounding")
    add("int4_layout", choices=("quark", "vllm"),
        help="with --quantize int4_wo_128 --format quark: quark (amd-quark's bytes, default) or vllm (its loader's layout)")
    add("convert_to_fp8", action="store_true",
        help="write the tensors the family YAML marks dtype: fp8 as 128x128 block FP8 even when the source holds them in bf16")
    add("quant_method", choices=QUANT_METHODS, default="pt",
        help="FP8 quantizer: pt (pure torch, default; TE's bytes) or te (TE's Float8BlockQuantizer, needs TE and a GPU)")
    add("force_pow_2_scales", type=_str2bool, nargs="?", const=True, default=True,
        help="FP8 block scales are powers of two (default true; --force_pow_2_scales false for fp32 scales)")
    add("amax_epsilon", type=_non_negative_float, default=0.0, help="FP8: floor on each block's amax (default 0)")
    add("fp8_force_no_requant", action="store_true",
        help="FP8: never requantize; a cut through a 128-block is an error, scales are kept in their style")
    add("device", type=_device, default="cpu",
        help="where FP8 and --quantize math runs: cpu (default), cuda (every GPU), cuda:N or cuda:N,M (files spread "
             "over the GPUs by estimated memory)")
    add("pretrain_as_fp8", action="store_true", help="accepted for LoongForge compatibility; no effect")
    add("max_shard_size", type=_size, default=5 * 1000**3, help="HF output shard cap (default 5GB)")
    add("safetensors", action="store_true", help="accepted for compatibility; HF I/O is always safetensors")
    add("distributed_convert", action="store_true",
        help="accepted for compatibility: a run under torchrun is always shared between its processes")
    add("megatron_path", help="accepted for compatibility; prepended to sys.path")
    _add_runtime_flags(add)
    _add_incumbent_flags(p)
    return p


def _add_incumbent_flags(p: argparse.ArgumentParser) -> None:
    """LoongForge's flags that this parser does not define itself (see ``compat``)."""
    group = p.add_argument_group("LoongForge compatibility (README: Coming from LoongForge)")
    for flag in compat.added_flags():
        names = [s for n in (flag.name, *flag.aliases) for s in _spellings(n)]
        kind: dict[str, Any] = {"action": "store_true"} if not flag.takes_value else {"metavar": "VALUE"}
        group.add_argument(*names, dest=flag.dest, help=f"{flag.treatment}: {flag.note}", **kind)


def _apply_quantize(ns: argparse.Namespace) -> None:
    """``--quantize SCHEME`` (+ its options) is the built-in ``quantize`` converter, run on the HF
    tensors after the model mapping."""
    given = [f for f in ("ignore", "targets", "format", "rounding", "int4_layout") if getattr(ns, f)]
    if ns.quantize is None:
        if given:
            raise ConversionError(f"--{given[0]} goes with --quantize")
        return
    if ns.save_platform != "huggingface":
        raise ConversionError(f"--quantize {ns.quantize} writes a quantized HuggingFace checkpoint: it needs "
                              "--save_platform huggingface")
    from .converters.quantize_ct import quantize_spec

    spec = quantize_spec(ns.quantize, None, ns.targets or (), ns.ignore or (), ns.rounding or "fp32", ns.device,
                         ns.format or "compressed-tensors", ns.int4_layout)
    ns.converter = [*(ns.converter or ()), spec]


def _apply_incumbent_flags(ns: argparse.Namespace) -> None:
    """Rejected flags stop here with one line; honoured ones become this tool's settings."""
    for flag in compat.added_flags():
        value = getattr(ns, flag.dest)
        if flag.treatment == compat.REJECTED and value not in (None, False) and str(value) not in flag.harmless:
            shown = "" if value is True else f" {value}"
            raise ConversionError(f"--{flag.name}{shown}: {flag.note}")
    if ns.resume_convert:
        ns.resume = True
    if ns.no_te:
        if ns.transformer_impl == "transformer_engine":
            raise ConversionError("--no-te contradicts --transformer_impl transformer_engine")
        ns.transformer_impl = "local"
    for dtype_flag in ("hf_dequantize_dtype", "torch_dtype"):
        value = getattr(ns, dtype_flag)
        if value is not None and value not in DTYPE_NAMES:
            raise ConversionError(f"--{dtype_flag} {value}: expected one of {', '.join(sorted(DTYPE_NAMES))}")
    _apply_vlm_flags(ns)
    if ns.hf_dequantize_int4:
        ns.converter = [*(ns.converter or ()), f"dequantize:dtype={ns.hf_dequantize_dtype or 'bfloat16'},if_quantized=true"]
    for name in ("num_experts", "vocab_size"):
        value = getattr(ns, name)
        if value is not None:
            try:
                setattr(ns, name, _non_negative(value))
            except argparse.ArgumentTypeError as e:
                raise ConversionError(f"--{name} {value}: {e}") from None


def _apply_vlm_flags(ns: argparse.Namespace) -> None:
    """LoongForge's single-pass VLM flags: both YAMLs together, a positive encoder TP size."""
    if bool(ns.vision_patch_convert_file) != bool(ns.adapter_convert_file):
        raise ConversionError("--vision_patch_convert_file and --adapter_convert_file go together (LoongForge's "
                              "single-pass VLM conversion); pass both or neither")
    if ns.adapter_convert_file and not os.path.isfile(ns.adapter_convert_file):
        raise ConversionError(f"--adapter_convert_file {ns.adapter_convert_file}: no such file")
    value = ns.encoder_tensor_model_parallel_size
    if value is not None:
        try:
            ns.encoder_tensor_model_parallel_size = _positive(value)
        except argparse.ArgumentTypeError as e:
            raise ConversionError(f"--encoder_tensor_model_parallel_size {value}: {e}") from None


def parse_options(argv: list[str] | None = None) -> ConvertOptions:
    ns = build_parser().parse_args(argv)
    _apply_incumbent_flags(ns)
    _apply_quantize(ns)
    if ns.megatron_path:
        sys.path.insert(0, ns.megatron_path)
    _check_runtime(ns)
    if ns.load_platform == ns.save_platform == "huggingface":
        raise ConversionError(
            "--load_platform and --save_platform are both huggingface; supported: huggingface<->mcore and mcore->mcore"
        )
    custom = parse_layer_list(ns.custom_pipeline_layers) if ns.custom_pipeline_layers else None
    if ns.ckpt_format != "torch" and ns.save_platform not in ("mcore", "mcore_dist"):
        raise ConversionError(f"--ckpt_format {ns.ckpt_format} chooses the Megatron-Core output format: it needs "
                              f"--save_platform mcore, not {ns.save_platform}")
    return ConvertOptions(
        load_platform=ns.load_platform,
        save_platform=ns.save_platform,
        load_ckpt_path=ns.load_ckpt_path,
        save_ckpt_path=ns.save_ckpt_path,
        config_file=ns.config_file,
        convert_file=ns.convert_file,
        tensor_model_parallel_size=ns.tensor_model_parallel_size,
        pipeline_model_parallel_size=ns.pipeline_model_parallel_size,
        virtual_stages=ns.num_virtual_stages_per_pipeline_rank,
        num_layers_per_virtual_pipeline_stage=ns.num_layers_per_virtual_pipeline_stage,
        custom_pipeline_layers=custom,
        make_vocab_size_divisible_by=ns.make_vocab_size_divisible_by,
        pad_vocab_size_to=ns.pad_vocab_size_to,
        add_embedding_padding=ns.add_embedding_padding,
        transformer_impl=ns.transformer_impl,
        expert_parallel_size=ns.expert_parallel_size,
        expert_tensor_parallel_size=ns.expert_tensor_parallel_size,
        moe_grouped_gemm=ns.moe_grouped_gemm,
        mtp_num_layers=ns.mtp_num_layers,
        mtp_layer_name=ns.mtp_layer_name,
        encoder_tensor_model_parallel_size=ns.encoder_tensor_model_parallel_size,
        vision_patch_convert_file=ns.vision_patch_convert_file,
        enable_full_hetero_dp=ns.enable_full_hetero_dp,
        ckpt_format=ns.ckpt_format,
        hf_config_path=ns.hf_config_path,
        converters=tuple(ns.converter or ()),
        convert_to_fp8=ns.convert_to_fp8,
        quant_method=ns.quant_method,
        force_pow_2_scales=ns.force_pow_2_scales,
        amax_epsilon=ns.amax_epsilon,
        fp8_force_no_requant=ns.fp8_force_no_requant,
        device=ns.device,
        max_shard_size=ns.max_shard_size,
        max_workers=ns.max_workers,
        io_threads=ns.io_threads,
        max_memory=ns.max_memory,
        world_size=ns.world_size,
        rank=ns.rank,
        overwrite=ns.overwrite,
        resume=ns.resume,
        strict_values=ns.strict_values,
        dry_run=ns.dry_run,
        verbose=ns.verbose,
        progress=not ns.no_progress,
        check_num_experts=ns.num_experts,
        check_vocab_size=ns.vocab_size,
        check_torch_dtype=DTYPE_NAMES[ns.torch_dtype] if ns.torch_dtype else None,
    )


def parse_hf_options(argv: list[str]) -> ConvertOptions:
    """``convert-checkpoint hf SOURCE TARGET --converter SPEC ...``: HF -> HF through converters."""
    p = one_line_parser("convert-checkpoint hf", "Rewrite a HuggingFace safetensors checkpoint through converters "
                        "(dequantize FP8 / compressed-tensors, ModelOpt NVFP4 or AutoAWQ to compressed-tensors), "
                        "shard by shard, without a model definition.")
    p.add_argument("model_stub", help="source checkpoint directory")
    p.add_argument("save_directory", help="target directory (must be empty unless --overwrite or --resume)")
    p.add_argument("--converter", action="append", required=True, metavar="SPEC", help=converter_help())
    _add_runtime_flags(_adder(p))
    ns = p.parse_args(argv)
    _check_runtime(ns)
    return ConvertOptions("huggingface", "huggingface", ns.model_stub, ns.save_directory, converters=tuple(ns.converter),
                          max_workers=ns.max_workers, io_threads=ns.io_threads, max_memory=ns.max_memory,
                          world_size=ns.world_size, rank=ns.rank,
                          overwrite=ns.overwrite, resume=ns.resume, strict_values=ns.strict_values, dry_run=ns.dry_run,
                          verbose=ns.verbose, progress=not ns.no_progress)
