#!/usr/bin/env bash
# qwen3_30b_a3b: Megatron-Core legacy checkpoint -> HuggingFace safetensors.
# TP/PP/VPP and naming are read off the rank files. HF_REFERENCE_PATH (optional) is the
# original HF directory whose config, generation config and tokenizer files are copied.
# EP, ETP and grouped-GEMM naming are read off the rank files too.
#   MCORE_CKPT_PATH=/ckpt/qwen3_30b_a3b-mcore HF_CKPT_PATH=/models/qwen3_30b_a3b-back bash examples/qwen3_30b_a3b/mcore_to_hf.sh
set -euo pipefail
: "${MCORE_CKPT_PATH:?set MCORE_CKPT_PATH to the Megatron checkpoint directory}"
: "${HF_CKPT_PATH:?set HF_CKPT_PATH to an empty output directory}"
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python}
extra=()
if [ -n "${HF_REFERENCE_PATH:-}" ]; then extra+=(--hf_config_path "$HF_REFERENCE_PATH"); fi
"$PYTHON" "$REPO/tools/convert_checkpoint/module_convertor/model.py" \
  --load_platform mcore --save_platform huggingface \
  --load_ckpt_path "$MCORE_CKPT_PATH" --save_ckpt_path "$HF_CKPT_PATH" \
  --max_shard_size 5GB --safetensors --max_workers "${MAX_WORKERS:-4}" \
  "${extra[@]}" "$@"
