#!/usr/bin/env bash
# minimax_m2: Megatron-Core legacy checkpoint -> HuggingFace safetensors (block_sparse_moe names).
#   MCORE_CKPT_PATH=/ckpt/minimax-m2-mcore HF_CKPT_PATH=/models/minimax-m2-back bash examples/minimax_m2/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-16}" "$@"
