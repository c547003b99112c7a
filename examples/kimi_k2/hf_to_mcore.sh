#!/usr/bin/env bash
# kimi_k2 (Kimi-K2-Instruct, DeepSeek-V3 layout, model_type kimi_k2): HuggingFace (bf16) -> Megatron-Core.
# 61 layers over 8 pipeline stages (8,7,8,8,8,8,8,6), no MTP layer (num_nextn_predict_layers 0),
# TP=8, 384 routed experts over EP=32 (12 per rank, ETP=1), TE grouped-GEMM names.
# Architecture and family are read from config.json. FP8 checkpoints: see issue 5 (not yet).
#   HF_CKPT_PATH=/models/Kimi-K2-Instruct-bf16 MCORE_CKPT_PATH=/ckpt/kimi-k2-mcore bash examples/kimi_k2/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-8}" --pipeline_model_parallel_size "${PP:-8}" \
  --custom_pipeline_layers "${PIPELINE_LAYERS:-8,7,8,8,8,8,8,6}" \
  --expert_parallel_size "${EP:-32}" --expert_tensor_parallel_size "${ETP:-1}" --moe-grouped-gemm \
  --mtp_num_layers "${MTP_NUM_LAYERS:-0}" \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-16}" "$@"
