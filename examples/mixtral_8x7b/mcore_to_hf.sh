#!/usr/bin/env bash
# mixtral_8x7b: Megatron-Core legacy checkpoint -> HuggingFace safetensors.
#   MCORE_CKPT_PATH=/ckpt/mixtral_8x7b-mcore HF_CKPT_PATH=/models/mixtral_8x7b-back bash examples/mixtral_8x7b/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-4}" "$@"
