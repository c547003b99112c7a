#!/usr/bin/env bash
# qwen3_30b_a3b: HuggingFace -> Megatron-Core legacy checkpoint (TE layer-spec names).
# Architecture and family are read from the HF config.json; no YAML flags needed.
#   HF_CKPT_PATH=/models/qwen3_30b_a3b MCORE_CKPT_PATH=/ckpt/qwen3_30b_a3b-mcore bash examples/qwen3_30b_a3b/hf_to_mcore.sh
set -euo pipefail
: "${HF_CKPT_PATH:?set HF_CKPT_PATH to the HuggingFace checkpoint directory}"
: "${MCORE_CKPT_PATH:?set MCORE_CKPT_PATH to an empty output directory}"
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python}
"$PYTHON" "$REPO/tools/convert_checkpoint/module_convertor/model.py" \
  --load_platform huggingface --save_platform mcore \
  --load_ckpt_path "$HF_CKPT_PATH" --save_ckpt_path "$MCORE_CKPT_PATH" \
  --tensor_model_parallel_size "${TP:-2}" --pipeline_model_parallel_size "${PP:-1}" \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --expert_parallel_size "${EP:-4}" --expert_tensor_parallel_size "${ETP:-1}" --moe-grouped-gemm \
  --make_vocab_size_divisible_by 128 --safetensors \
  --max_workers "${MAX_WORKERS:-4}" "$@"
