#!/usr/bin/env bash
# deepseek_v3 (also DeepSeek-R1): HuggingFace (bf16) -> Megatron-Core legacy checkpoint.
# 61 layers over 8 pipeline stages (8,7,8,8,8,8,8,6: the last stage also holds the MTP layer),
# TP=8, 256 routed experts over EP=32 with whole experts (ETP=1), TE grouped-GEMM names.
# Architecture and family are read from config.json. For the published FP8 checkpoint use
# hf_fp8_to_mcore_fp8.sh (the same layout, FP8 weights kept FP8).
#   HF_CKPT_PATH=/models/DeepSeek-V3-bf16 MCORE_CKPT_PATH=/ckpt/dsv3-mcore bash examples/deepseek_v3/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-8}" --pipeline_model_parallel_size "${PP:-8}" \
  --custom_pipeline_layers "${PIPELINE_LAYERS:-8,7,8,8,8,8,8,6}" \
  --expert_parallel_size "${EP:-32}" --expert_tensor_parallel_size "${ETP:-1}" --moe-grouped-gemm \
  --mtp_num_layers "${MTP_NUM_LAYERS:-1}" \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-16}" "$@"
