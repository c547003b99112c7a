#!/usr/bin/env bash
# qwen2_5_7b: Megatron-Core legacy checkpoint -> HuggingFace safetensors.
# FOREIGN_CHECKPOINT=1: a Megatron checkpoint not written by this tool; the architecture YAML is used.
#   MCORE_CKPT_PATH=/ckpt/qwen2_5_7b-mcore HF_CKPT_PATH=/models/qwen2_5_7b-back bash examples/qwen2_5_7b/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
extra=()
if [ -n "${FOREIGN_CHECKPOINT:-}" ]; then extra+=(--config_file "$REPO/configs/models/qwen2/qwen2_5_7b.yaml"); fi
mcore_to_hf --max_workers "${MAX_WORKERS:-4}" "${extra[@]}" "$@"
