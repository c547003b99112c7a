#!/usr/bin/env bash
# glm4_moe: Megatron-Core legacy checkpoint -> HuggingFace safetensors (the MTP layer back as
# model.layers.{num_layers}.*, with its embed_tokens / shared_head.head copies). The layout is
# read off the rank files.
#   MCORE_CKPT_PATH=/ckpt/glm45-air-mcore HF_CKPT_PATH=/models/glm45-air-back bash examples/glm4_moe/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-16}" "$@"
