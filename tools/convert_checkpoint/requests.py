"""Small frozen requests derived from the flags: each planning step takes the one it needs.

``options.ConvertOptions`` is the record of the flags as given (kept whole for the report and
the resume fingerprint); ``ConvertOptions.plan_request()`` and ``run_options()`` split it into
what shapes the output (``PlanRequest`` and its parts) and how the run goes (``RunOptions``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelRequest:
    """Where the model's family and architecture come from, besides the checkpoint itself."""

    config_file: str | None = None  # architecture YAML, overrides what the checkpoint says
    convert_file: str | None = None  # family YAML, instead of picking one by model_type
    mtp_num_layers: int | None = None  # None: as the checkpoint says
    # LoongForge's single-pass VLM conversion: its image-encoder convert YAML (picks our VL family)
    vision_convert_file: str | None = None


@dataclass(frozen=True)
class LayoutRequest:
    """The Megatron layout flags; None (False for grouped_gemm) = not given. A target builds its
    layout from them; a source reads its layout off the files and checks the given ones agree."""

    tp: int | None = None
    pp: int | None = None
    virtual_stages: int | None = None
    layers_per_virtual_stage: int | None = None
    custom_pipeline_layers: tuple[int, ...] | None = None
    transformer_impl: str | None = None
    ep: int | None = None
    etp: int | None = None
    grouped_gemm: bool = False
    mtp_layer_name: str | None = None
    encoder_tp: int | None = None  # vision-language models: --encoder_tensor_model_parallel_size (default: TP)
    full_hetero_dp: bool = False  # LoongForge's --enable-full-hetero-dp: a tower copy in every stage (refused)


@dataclass(frozen=True)
class VocabPadding:
    make_vocab_size_divisible_by: int = 128
    pad_vocab_size_to: int | None = None
    add_embedding_padding: bool = True


@dataclass(frozen=True)
class Fp8Request:
    convert_to_fp8: bool = False  # write the YAML's dtype: fp8 tensors as FP8 even from bf16
    quant_method: str = "pt"
    force_pow_2_scales: bool = True
    amax_epsilon: float = 0.0
    force_no_requant: bool = False
    device: str = "cpu"


@dataclass(frozen=True)
class TargetDir:
    """The output directory and how an existing one may be treated."""

    path: str
    overwrite: bool = False
    resume: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class ModelChecks:
    """Values the model must have (LoongForge's --num_experts, --vocab_size, --torch_dtype)."""

    num_experts: int | None = None
    vocab_size: int | None = None
    torch_dtype: str | None = None  # a torch dtype name, e.g. "bfloat16"


@dataclass(frozen=True)
class KtRequest:
    """KTransformers CPU-expert output (``convert-checkpoint kt``; kt-kernel's flag meanings)."""

    quant_method: str = "int4"  # int4 | int8 (AMXINT4 / AMXINT8)
    parts: int = 2  # --threadpool-count: NUMA parts the intermediate dimension is split into
    merge: bool = True  # False: --no-merge-safetensor, raw _layer_L/_numa_p/*.kt files
    input_type: str | None = None  # bf16 | fp16 | fp8 | awq; None: as the checkpoint is
    ieee_scales: bool = False  # INT8 scale by a true division instead of kt-kernel's fast-math multiply


@dataclass(frozen=True)
class PlanRequest:
    load_format: str  # a registered endpoint name (--load_platform)
    save_format: str  # (--save_platform)
    source_path: str
    target: TargetDir
    model: ModelRequest = ModelRequest()
    layout: LayoutRequest = LayoutRequest()
    vocab: VocabPadding = VocabPadding()
    fp8: Fp8Request = Fp8Request()
    converters: tuple[Any, ...] = ()  # spec strings or Converter objects, run on an HF source first
    max_shard_size: int = 5 * 1000**3  # HF output shards
    hf_config_path: str | None = None  # HF output: copy config and tokenizer files from here
    checks: ModelChecks = ModelChecks()
    kt: KtRequest = KtRequest()  # the kt_cpu target's settings


@dataclass(frozen=True)
class RunOptions:
    """How a planned conversion runs; none of these change the output bytes."""

    max_workers: int | str = 1  # a count, or "auto" (resolved by workers.choose once the plan is known)
    max_memory: int | None = None  # None: half of the available memory
    world_size: int | None = None
    rank: int | None = None
    overwrite: bool = False
    resume: bool = False
    strict_values: bool = False
    dry_run: bool = False
    verbose: bool = False
    progress: bool = True
    gpus: tuple[int, ...] = ()  # CUDA devices the workers' math is spread over (--device)
    io_threads: int | str = "auto"  # threads per worker copying moved tensors, or "auto" (workers.choose)
