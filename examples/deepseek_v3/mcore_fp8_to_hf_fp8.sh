#!/usr/bin/env bash
# deepseek_v3: Megatron-Core with FP8 parameters -> HF FP8 in DeepSeek's layout (weight +
# weight_scale_inv; embeddings, norms, router and eh_proj bf16, expert bias fp32), with
# quantization_config in config.json (scale_fmt ue8m0 when every scale is a power of two).
# Whole blocks are kept bit for bit; the layout is read off the rank files.
#   MCORE_CKPT_PATH=/ckpt/dsv3-fp8 HF_CKPT_PATH=/models/dsv3-fp8-back bash examples/deepseek_v3/mcore_fp8_to_hf_fp8.sh
exec bash "$(dirname "$0")/mcore_to_hf.sh" \
  --quant_method "${QUANT_METHOD:-pt}" --force_pow_2_scales "${FORCE_POW_2_SCALES:-true}" \
  --amax_epsilon "${AMAX_EPSILON:-0}" "$@"
