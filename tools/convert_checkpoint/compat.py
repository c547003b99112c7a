"""Every flag of LoongForge's ``convert_checkpoint`` parser, and what this tool does with it.

Scripts copied from LoongForge's examples must run unchanged, so every flag its parser defines
is accepted in both spellings. Each has one treatment:

* ``honoured``: same meaning here (most are this tool's own flags under the same name);
* ``no-op``: accepted and ignored because it cannot change what this tool writes;
* ``rejected``: a value that would change the result is not built yet: one error line naming
  the flag and what to use instead (values listed in ``harmless`` are the default behaviour and
  pass).

``options.build_parser`` adds the flags this tool does not define itself; the README's table
is generated from ``FLAGS`` (``python -m convert_checkpoint.docs``).
"""
from __future__ import annotations

from dataclasses import dataclass

HONOURED, NO_OP, REJECTED = "honoured", "no-op", "rejected"


@dataclass(frozen=True)
class IncumbentFlag:
    name: str  # as the incumbent's parser spells it (both spellings are accepted)
    treatment: str
    note: str  # what it does here, or what to use instead
    takes_value: bool = True
    ours: bool = False  # this tool's parser defines it (honoured under the same name)
    harmless: tuple[str, ...] = ()  # rejected flag: values that are the default behaviour

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def aliases(self) -> tuple[str, ...]:
        """Extra option names (the incumbent's second name for one flag)."""
        return _ALIASES.get(self.name, ())


_ALIASES = {"no-te": ("input-layernorm-not-in-attn",)}

_VLM = "vision-language models are not supported yet; convert the language model with its own --convert_file"
_LORA = "LoRA merging is not supported yet; merge the adapter into the base weights first"
_QUANT_OUT = "quantized HF output is not built yet; write the bf16 or FP8 checkpoint and quantize it separately"
_PARTIAL = "partial conversions for testing are not supported; the whole model is converted (use --dry_run to inspect)"

FLAGS: tuple[IncumbentFlag, ...] = (
    IncumbentFlag("load_platform", HONOURED, "source format", ours=True),
    IncumbentFlag("save_platform", HONOURED, "target format", ours=True),
    IncumbentFlag("load_ckpt_path", HONOURED, "source directory", ours=True),
    IncumbentFlag("save_ckpt_path", HONOURED, "target directory", ours=True),
    IncumbentFlag("common_config_path", REJECTED, "not read; give the architecture with --config_file"),
    IncumbentFlag("megatron_path", HONOURED, "prepended to sys.path (Megatron itself is not needed)", ours=True),
    IncumbentFlag("no_load_optim", NO_OP, "optimizer state is never read", takes_value=False),
    IncumbentFlag("no_save_optim", NO_OP, "optimizer state is never written", takes_value=False),
    IncumbentFlag("model_type_custom", REJECTED, "the family comes from config.json or --convert_file; pass --convert_file"),
    IncumbentFlag("safetensors", NO_OP, "HF I/O is always safetensors", takes_value=False, ours=True),
    IncumbentFlag("convert_to_fp8", HONOURED, "quantize the YAML's dtype: fp8 tensors to 128x128 block FP8",
                  takes_value=False, ours=True),
    IncumbentFlag("quant_method", HONOURED, "te or pt; default pt here, which writes TE's bytes without TE", ours=True),
    IncumbentFlag("fp8_force_no_requant", HONOURED, "never requantize FP8 blocks", takes_value=False, ours=True),
    IncumbentFlag("force_pow_2_scales", HONOURED, "power-of-two FP8 scales; default true here "
                  "(`--force_pow_2_scales false` for fp32 scales)", ours=True),
    IncumbentFlag("amax_epsilon", HONOURED, "floor on each FP8 block's amax", ours=True),
    IncumbentFlag("pretrain_as_fp8", NO_OP, "training-time setting; no effect on the files", takes_value=False, ours=True),
    IncumbentFlag("hf-dequantize-int4", HONOURED, "same as --converter dequantize (compressed-tensors INT4 and other "
                  "formats, to --hf-dequantize-dtype)", takes_value=False),
    IncumbentFlag("hf-dequantize-dtype", HONOURED, "the dtype of --hf-dequantize-int4 (default bfloat16)"),
    IncumbentFlag("hf-dequantize-mxfp4", REJECTED, "MXFP4 checkpoints (GPT-OSS) are not supported yet", takes_value=False),
    IncumbentFlag("hf-quant-config-file", REJECTED, "not read; the checkpoint's own config.json gives quantization_config"),
    IncumbentFlag("hf-official-config-file", REJECTED, _QUANT_OUT),
    IncumbentFlag("hf-pack-quantized-from-config", REJECTED, _QUANT_OUT, takes_value=False),
    IncumbentFlag("hf-pack-quantized-target-regex", REJECTED, _QUANT_OUT),
    IncumbentFlag("fp8_quant_transfer_type", NO_OP, "FP8 codes and scales are moved as they are, never through "
                  "a transfer dtype"),
    IncumbentFlag("distributed_convert", NO_OP, "a run under torchrun is always shared between its processes",
                  takes_value=False, ours=True),
    IncumbentFlag("config_file", HONOURED, "architecture YAML (ours or LoongForge's model YAML)", ours=True),
    IncumbentFlag("convert_file", HONOURED, "family YAML (ours or LoongForge's convert YAML)", ours=True),
    IncumbentFlag("config_name", REJECTED, "Hydra config names are not used; pass the YAML's path as --config_file"),
    IncumbentFlag("module", REJECTED, "only the language model is converted", harmless=("language",)),
    IncumbentFlag("mtp_num_layers", HONOURED, "MTP layers (0: none)", ours=True),
    IncumbentFlag("load_lora_ckpt_path", REJECTED, _LORA),
    IncumbentFlag("lora_alpha", REJECTED, _LORA),
    IncumbentFlag("lora_dim", REJECTED, _LORA),
    IncumbentFlag("adapter_convert_file", HONOURED, "VLM projector YAML: checked to exist and to go with "
                  "--vision_patch_convert_file (the merger's names come from our family)"),
    IncumbentFlag("vision_patch_convert_file", HONOURED, "VLM image-encoder YAML: with --convert_file picks our "
                  "vision-language family (qwen2_5_vit: qwen2_5_vl, qwen3_vit: qwen3_vl or qwen3_vl_moe)"),
    IncumbentFlag("encoder_tensor_model_parallel_size", HONOURED, "the vision tower's TP size (default: TP); "
                  "must divide TP and the tower's heads and MLP size"),
    IncumbentFlag("enable-full-hetero-dp", NO_OP, "data-parallel setting; rank files do not depend on it (a "
                  "vision-language model at PP > 1, whose tower it would copy into every stage, is refused)",
                  takes_value=False),
    IncumbentFlag("hf_checkpoint_device", NO_OP, "HF tensors are read and written from disk on the CPU; --device "
                  "chooses where FP8 math runs"),
    IncumbentFlag("torch_dtype", HONOURED, "checked: must be the checkpoint's own dtype (casting is not built yet)"),
    IncumbentFlag("vocab_size", HONOURED, "checked: must equal the model's vocabulary size"),
    IncumbentFlag("vpp-scheduler", REJECTED, "the dualpipev schedule is not supported yet"),
    IncumbentFlag("num-virtual-stages-per-pipeline-rank", HONOURED, "virtual pipeline chunks per rank", ours=True),
    IncumbentFlag("decoder-first-pipeline-num-layers", REJECTED, "use --custom_pipeline_layers"),
    IncumbentFlag("decoder-last-pipeline-num-layers", REJECTED, "use --custom_pipeline_layers"),
    IncumbentFlag("vit_in_first_virtual_stage_only", HONOURED, "the vision tower is always written to the first "
                  "virtual stage (model0) only", takes_value=False),
    IncumbentFlag("use_distributed_optimizer", NO_OP, "optimizer state is never written", takes_value=False),
    IncumbentFlag("tensor_model_parallel_size", HONOURED, "TP (MCore source: read off the files and checked)", ours=True),
    IncumbentFlag("pipeline_model_parallel_size", HONOURED, "PP (MCore source: read off the files and checked)", ours=True),
    IncumbentFlag("data_parallel_size", NO_OP, "legacy rank files do not depend on DP"),
    IncumbentFlag("expert_parallel_size", HONOURED, "EP", ours=True),
    IncumbentFlag("expert_tensor_parallel_size", HONOURED, "ETP (default: TP)", ours=True),
    IncumbentFlag("pad_vocab_size_to", HONOURED, "explicit padded vocabulary", ours=True),
    IncumbentFlag("add_embedding_padding", HONOURED, "pad embedding rows", ours=True),
    IncumbentFlag("make_vocab_size_divisible_by", HONOURED, "vocabulary padding multiple (x TP)", ours=True),
    IncumbentFlag("custom_pipeline_layers", HONOURED, "layers per (virtual) stage", ours=True),
    IncumbentFlag("pipeline_model_parallel_layout", REJECTED, "layout strings are not supported yet; use "
                  "--custom_pipeline_layers"),
    IncumbentFlag("num_layers_per_virtual_pipeline_stage", HONOURED, "layers per virtual stage", ours=True),
    IncumbentFlag("transformer_impl", HONOURED, "transformer_engine or local names", ours=True),
    IncumbentFlag("num_experts", HONOURED, "checked: must equal the model's routed experts"),
    IncumbentFlag("checkpoint-format", REJECTED, "HF checkpoints are read and written as safetensors",
                  harmless=("safetensors",)),
    IncumbentFlag("max_workers", HONOURED, "worker processes", ours=True),
    IncumbentFlag("no-te", HONOURED, "local (non-TE) names, as --transformer_impl local", takes_value=False),
    IncumbentFlag("moe-grouped-gemm", HONOURED, "TE grouped-linear expert names", takes_value=False, ours=True),
    IncumbentFlag("resume-convert", HONOURED, "as --resume: verified finished files are kept", takes_value=False),
    IncumbentFlag("cache-path", NO_OP, "no cache is used: every output file is built from the source directly"),
    IncumbentFlag("layer-for-test", REJECTED, _PARTIAL),
    IncumbentFlag("num-experts-for-test", REJECTED, _PARTIAL),
    IncumbentFlag("sub-num-layers-for-save", REJECTED, "files are streamed one at a time already; drop the flag"),
    IncumbentFlag("save-sub-checkpoint-by-pp", REJECTED, "files are streamed one at a time already; drop the flag",
                  takes_value=False),
    IncumbentFlag("sub_file_tag", REJECTED, "files are streamed one at a time already; drop the flag"),
)


def added_flags() -> list[IncumbentFlag]:
    """The incumbent's flags this tool's own parser does not define."""
    return [f for f in FLAGS if not f.ours]


def markdown_table() -> str:
    lines = ["| LoongForge flag | here | what it does / what to use instead |", "|---|---|---|"]
    for f in FLAGS:
        names = " ".join(f"`--{n}`" for n in (f.name, *f.aliases))
        lines.append(f"| {names} | {f.treatment} | {f.note} |")
    return "\n".join(lines)
