#!/usr/bin/env bash
# qwen3_30b_a3b: Megatron-Core legacy checkpoint -> HuggingFace safetensors.
#   MCORE_CKPT_PATH=/ckpt/qwen3_30b_a3b-mcore HF_CKPT_PATH=/models/qwen3_30b_a3b-back bash examples/qwen3_30b_a3b/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-4}" "$@"
