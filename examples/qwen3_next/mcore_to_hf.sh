#!/usr/bin/env bash
# qwen3_next (and qwen3_5 / qwen3_5_moe): Megatron-Core legacy checkpoint -> HuggingFace
# safetensors (in_proj back as in_proj_qkvz + in_proj_ba grouped by key head, or as Qwen3.5's
# in_proj_qkv / z / b / a; out_norm + 1 back to the gated norm's weight). The layout is read off
# the rank files.
#   MCORE_CKPT_PATH=/ckpt/qwen3-next-mcore HF_CKPT_PATH=/models/qwen3-next-back bash examples/qwen3_next/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-16}" "$@"
