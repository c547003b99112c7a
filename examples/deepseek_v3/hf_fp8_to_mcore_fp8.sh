#!/usr/bin/env bash
# deepseek_v3: the published FP8 checkpoint (e4m3 weights + 128x128 weight_scale_inv) ->
# Megatron-Core with FP8 parameters (TE Float8BlockwiseQTensor in the rank files), same layout
# as hf_to_mcore.sh. No bf16 detour: codes and scales are copied bit for bit wherever a TP/EP
# cut falls on a 128-block boundary (all of DeepSeek-V3's at TP=8) and the scale style matches.
# DeepSeek-V3/R1 publish fp32 scales; TE's blockwise recipe trains with power-of-two scales, so
# by default (FORCE_POW_2_SCALES=true) they are requantized to powers of two (reported);
# FORCE_POW_2_SCALES=false keeps the published bytes. DeepSeek-V3.1+ (scale_fmt ue8m0) keeps them
# either way with the default. QUANT_METHOD=te uses TE's quantizer (GPU), pt gives the same bytes.
#   HF_CKPT_PATH=/models/DeepSeek-V3 MCORE_CKPT_PATH=/ckpt/dsv3-fp8 bash examples/deepseek_v3/hf_fp8_to_mcore_fp8.sh
exec bash "$(dirname "$0")/hf_to_mcore.sh" \
  --quant_method "${QUANT_METHOD:-pt}" --force_pow_2_scales "${FORCE_POW_2_SCALES:-true}" \
  --amax_epsilon "${AMAX_EPSILON:-0}" "$@"
