"""The Megatron layout the flags ask for, and the checks that a model fits it."""
from __future__ import annotations

from ..config.arch import ModelArch
from ..config.vision import vision_arch
from ..core.canonical import CanonicalTensor
from ..errors import ConversionError
from ..requests import LayoutRequest, VocabPadding
from .pipeline import build_pipeline_layout
from .placement import MTP_INNER_LAYER, ParallelLayout, is_vision
from .tensor_parallel import divides, padded_vocab_size


def resolve_padded_vocab(vocab_request: VocabPadding, vocab: int, tp: int) -> int:
    if vocab_request.pad_vocab_size_to is not None:
        if vocab_request.pad_vocab_size_to < vocab:
            raise ConversionError(f"--pad_vocab_size_to {vocab_request.pad_vocab_size_to} is smaller than the vocabulary ({vocab})")
        return vocab_request.pad_vocab_size_to
    if not vocab_request.add_embedding_padding:
        return vocab
    return padded_vocab_size(vocab, vocab_request.make_vocab_size_divisible_by, tp)


def layout_from_flags(flags: LayoutRequest, vocab: VocabPadding, arch: ModelArch) -> ParallelLayout:
    """The layout a Megatron target is written in (flags not given take Megatron's defaults)."""
    tp = flags.tp or 1
    pipe = build_pipeline_layout(
        arch.num_layers,
        flags.pp or 1,
        flags.virtual_stages,
        flags.custom_pipeline_layers,
        flags.layers_per_virtual_stage,
    )
    return ParallelLayout(
        tp=tp,
        pipeline=pipe,
        transformer_impl=flags.transformer_impl or "transformer_engine",
        padded_vocab_size=resolve_padded_vocab(vocab, arch.vocab_size, tp),
        tied_embeddings=arch.tied_embeddings,
        # A MoE model without --expert_parallel_size keeps every expert (EP=1), never skips them.
        ep=flags.ep or 1,
        etp=flags.etp,
        num_experts=arch.num_experts or 0,
        grouped_gemm=flags.grouped_gemm,
        mtp_num_layers=arch.mtp_num_layers,
        mtp_inner_name=flags.mtp_layer_name or MTP_INNER_LAYER,
        encoder_tp=_encoder_tp(flags, arch, tp),
    )


def _encoder_tp(flags: LayoutRequest, arch: ModelArch, tp: int) -> int | None:
    """The vision tower's TP size: --encoder_tensor_model_parallel_size, else TP; None without a tower."""
    if arch.vision is None:
        if flags.encoder_tp is not None:
            raise ConversionError(f"--encoder_tensor_model_parallel_size applies to vision-language models; this "
                                  f"{arch.family} model has no vision tower")
        return None
    if flags.full_hetero_dp and (flags.pp or 1) > 1:
        raise ConversionError("--enable-full-hetero-dp: a copy of the vision tower in every pipeline stage is not "
                              "supported yet; the tower is written to the first stage (drop the flag)")
    encoder_tp = flags.encoder_tp or tp
    if tp % encoder_tp:
        raise ConversionError(f"--encoder_tensor_model_parallel_size {encoder_tp} does not divide "
                              f"--tensor_model_parallel_size {tp} (rank file t holds encoder shard t mod {encoder_tp})")
    vision = vision_arch(arch)
    for what, value in (("num_heads", vision.num_attention_heads), ("intermediate_size", vision.ffn_hidden_size)):
        if value % encoder_tp:
            raise ConversionError(f"--encoder_tensor_model_parallel_size {encoder_tp} does not divide the vision "
                                  f"tower's {what} {value}")
    return encoder_tp


def validate_tensor_parallel(arch: ModelArch, tensors: list[CanonicalTensor], layout: ParallelLayout) -> None:
    tp, etp = layout.tp, layout.expert_tp
    for what, value in (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_query_groups", arch.num_query_groups),
        ("ffn_hidden_size", arch.ffn_hidden_size),
        ("padded vocab size", layout.padded_vocab_size),
        # gated delta-net heads go whole to a TP rank (in_proj, conv1d, A_log, dt_bias per head)
        ("linear_num_key_heads", arch.linear_num_key_heads if arch.linear_attention_pattern else 0),
        ("linear_num_value_heads", arch.linear_num_value_heads if arch.linear_attention_pattern else 0),
    ):
        if value and value % tp:
            raise ConversionError(f"--tensor_model_parallel_size {tp} does not divide {what} {value}")
    if arch.num_experts:
        if arch.num_experts % layout.ep:
            raise ConversionError(f"--expert_parallel_size {layout.ep} does not divide num_experts {arch.num_experts}")
        if (arch.moe_ffn_hidden_size or 0) % etp:
            flag = "--expert_tensor_parallel_size" if layout.etp is not None else "--tensor_model_parallel_size"
            raise ConversionError(f"{flag} {etp} does not divide moe_ffn_hidden_size {arch.moe_ffn_hidden_size}")
    elif layout.ep > 1 or layout.etp is not None or layout.grouped_gemm:
        raise ConversionError(
            "--expert_parallel_size, --expert_tensor_parallel_size and --moe-grouped-gemm apply to "
            f"mixture-of-experts models; this {arch.family} model has no routed experts"
        )
    layout.expert_files()  # raises on an EP/ETP/TP combination a legacy checkpoint cannot hold
    for t in tensors:
        parts, flag = (etp, "--expert_tensor_parallel_size") if t.expert is not None else (tp, "--tensor_model_parallel_size")
        if layout.encoder_tp is not None and is_vision(t.name):
            parts, flag = layout.encoder_tp, "--encoder_tensor_model_parallel_size"
        if not divides(t.shape, t.split, parts, layout.padded_vocab_size):
            raise ConversionError(
                f"{flag} {parts} does not divide tensor {t.name} of shape {list(t.shape)} ({t.split.value} split)"
            )
        if t.expert is not None and etp > 1 and t.name.endswith(".bias"):
            # megatron-core's TransformerConfig asserts "Bias in Moe is only supported when ETP==1"
            raise ConversionError(f"routed experts with biases ({t.name}) need expert tensor parallel size 1 in "
                                  f"megatron-core, got {etp}: pass --expert_tensor_parallel_size 1")
