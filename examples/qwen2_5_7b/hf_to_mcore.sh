#!/usr/bin/env bash
# qwen2_5_7b: HuggingFace -> Megatron-Core legacy checkpoint (TE layer-spec names).
# Architecture and family are read from the HF config.json; no YAML flags needed.
#   HF_CKPT_PATH=/models/qwen2_5_7b MCORE_CKPT_PATH=/ckpt/qwen2_5_7b-mcore bash examples/qwen2_5_7b/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-4}" --pipeline_model_parallel_size "${PP:-1}" \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-4}" "$@"
