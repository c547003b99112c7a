#!/usr/bin/env bash
# deepseek_v3: Megatron-Core legacy checkpoint -> HuggingFace safetensors (bf16, with the MTP
# layer as model.layers.61.* including its embed_tokens / shared_head.head copies).
#   MCORE_CKPT_PATH=/ckpt/dsv3-mcore HF_CKPT_PATH=/models/dsv3-back bash examples/deepseek_v3/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-16}" "$@"
