#!/usr/bin/env bash
# deepseek_v2_lite: Megatron-Core legacy checkpoint -> HuggingFace safetensors.
#   MCORE_CKPT_PATH=/ckpt/dsv2-lite-mcore HF_CKPT_PATH=/models/dsv2-lite-back bash examples/deepseek_v2_lite/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-4}" "$@"
