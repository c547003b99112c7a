#!/usr/bin/env bash
# llama3_8b: Megatron-Core legacy checkpoint -> HuggingFace safetensors.
# FOREIGN_CHECKPOINT=1: a Megatron checkpoint not written by this tool; the architecture YAML is used.
#   MCORE_CKPT_PATH=/ckpt/llama3_8b-mcore HF_CKPT_PATH=/models/llama3_8b-back bash examples/llama3_8b/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
extra=()
if [ -n "${FOREIGN_CHECKPOINT:-}" ]; then extra+=(--config_file "$REPO/configs/models/llama/llama3_8b.yaml"); fi
mcore_to_hf --max_workers "${MAX_WORKERS:-4}" "${extra[@]}" "$@"
