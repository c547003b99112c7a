#!/usr/bin/env bash
# deepseek_v32: Megatron-Core legacy checkpoint -> HuggingFace safetensors (indexer tensors back
# under self_attn.indexer.*, the MTP layer as model.layers.61.*). Layout read off the rank files.
#   MCORE_CKPT_PATH=/ckpt/dsv32-mcore HF_CKPT_PATH=/models/dsv32-back bash examples/deepseek_v32/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-16}" "$@"
