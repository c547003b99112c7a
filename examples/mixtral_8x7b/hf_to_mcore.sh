#!/usr/bin/env bash
# mixtral_8x7b: HuggingFace -> Megatron-Core legacy checkpoint (TE layer-spec names).
# Architecture and family are read from the HF config.json; no YAML flags needed.
#   HF_CKPT_PATH=/models/mixtral_8x7b MCORE_CKPT_PATH=/ckpt/mixtral_8x7b-mcore bash examples/mixtral_8x7b/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-2}" --pipeline_model_parallel_size "${PP:-2}" \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --expert_parallel_size "${EP:-2}" --expert_tensor_parallel_size "${ETP:-1}" --moe-grouped-gemm \
  --max_workers "${MAX_WORKERS:-4}" "$@"
