#!/usr/bin/env bash
# qwen2_5_vl: Megatron-Core legacy checkpoint -> HuggingFace safetensors (visual.*, model.*, lm_head).
# The layout, the encoder TP size included, is read off the rank files.
#   MCORE_CKPT_PATH=/ckpt/qwen25vl-7b-mcore HF_CKPT_PATH=/models/qwen25vl-7b-back bash examples/qwen2_5_vl/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-8}" "$@"
