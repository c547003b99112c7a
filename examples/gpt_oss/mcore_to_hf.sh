#!/usr/bin/env bash
# gpt_oss: Megatron-Core legacy checkpoint -> HuggingFace safetensors in bf16 (experts fused back
# into gate_up_proj [E, hidden, 2*inter] with gate/up interleaved, as transformers loads them;
# a MXFP4 reference's quantization_config is not copied). The layout is read off the rank files.
#   MCORE_CKPT_PATH=/ckpt/gpt-oss-120b-mcore HF_CKPT_PATH=/models/gpt-oss-120b-bf16 bash examples/gpt_oss/mcore_to_hf.sh
source "$(dirname "$0")/../common.sh"
mcore_to_hf --max_workers "${MAX_WORKERS:-16}" "$@"
