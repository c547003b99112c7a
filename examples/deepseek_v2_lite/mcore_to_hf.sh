#!/usr/bin/env bash
# deepseek_v2_lite: Megatron-Core legacy checkpoint -> HuggingFace safetensors.
# TP/PP/EP/ETP, the layer split, grouped-GEMM and TE naming are read off
# the rank files. HF_REFERENCE_PATH (optional): the original HF directory whose config,
# generation config and tokenizer files are copied (modeling files too).
#   MCORE_CKPT_PATH=/ckpt/dsv2-lite-mcore HF_CKPT_PATH=/models/dsv2-lite-back bash examples/deepseek_v2_lite/mcore_to_hf.sh
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
