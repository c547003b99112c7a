#!/usr/bin/env bash
# kimi_k2: Megatron-Core legacy checkpoint -> HuggingFace safetensors (bf16). config.json keeps
# model_type kimi_k2 when written by this tool; pass HF_REFERENCE_PATH for the tokenizer and modeling code.
# TP/PP/EP/ETP, the layer split, grouped-GEMM and TE naming and the MTP layers are read off
# the rank files. HF_REFERENCE_PATH (optional): the original HF directory whose config,
# generation config and tokenizer files are copied (modeling files too).
#   MCORE_CKPT_PATH=/ckpt/kimi-k2-mcore HF_CKPT_PATH=/models/kimi-k2-back bash examples/kimi_k2/mcore_to_hf.sh
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
  --max_shard_size 5GB --safetensors --max_workers "${MAX_WORKERS:-16}" \
  "${extra[@]}" "$@"
