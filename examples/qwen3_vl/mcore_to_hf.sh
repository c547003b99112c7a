#!/usr/bin/env bash
# qwen3_vl: Megatron-Core legacy checkpoint -> HuggingFace safetensors (model.visual.*,
# model.language_model.*, lm_head). The layout, the encoder TP size included, is read off the rank files.
#   MCORE_CKPT_PATH=/ckpt/qwen3vl-8b-mcore HF_CKPT_PATH=/models/qwen3vl-8b-back bash examples/qwen3_vl/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-8}" "$@"
