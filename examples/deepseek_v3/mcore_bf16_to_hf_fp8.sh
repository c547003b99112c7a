#!/usr/bin/env bash
# deepseek_v3: Megatron-Core bf16 (e.g. after bf16 training) -> HF FP8 in DeepSeek's layout:
# --convert_to_fp8 quantizes the tensors the family YAML marks dtype: fp8 (attention and MLP
# weight matrices) into 128x128 blocks; everything else keeps its dtype.
#   MCORE_CKPT_PATH=/ckpt/dsv3-bf16 HF_CKPT_PATH=/models/dsv3-fp8 bash examples/deepseek_v3/mcore_bf16_to_hf_fp8.sh
exec bash "$(dirname "$0")/mcore_to_hf.sh" --convert_to_fp8 \
  --quant_method "${QUANT_METHOD:-pt}" --force_pow_2_scales "${FORCE_POW_2_SCALES:-true}" \
  --amax_epsilon "${AMAX_EPSILON:-0}" "$@"
