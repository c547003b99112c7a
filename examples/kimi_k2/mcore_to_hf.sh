#!/usr/bin/env bash
# kimi_k2: Megatron-Core legacy checkpoint -> HuggingFace safetensors (bf16). config.json keeps
# model_type kimi_k2 when written by this tool; pass HF_REFERENCE_PATH for the tokenizer and modeling code.
#   MCORE_CKPT_PATH=/ckpt/kimi-k2-mcore HF_CKPT_PATH=/models/kimi-k2-back bash examples/kimi_k2/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-16}" "$@"
