#!/usr/bin/env bash
# qwen3_8b: HuggingFace -> Megatron-Core legacy checkpoint (TE layer-spec names).
# Architecture and family are read from the HF config.json; no YAML flags needed.
#   HF_CKPT_PATH=/models/qwen3_8b MCORE_CKPT_PATH=/ckpt/qwen3_8b-mcore bash examples/qwen3_8b/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-2}" --pipeline_model_parallel_size "${PP:-4}" \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-4}" "$@"
