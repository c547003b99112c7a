#!/usr/bin/env bash
# qwen2_5_vl (Qwen2.5-VL-7B-Instruct; 3B/32B/72B with their own sizes): HuggingFace (bf16) -> Megatron-Core,
# laid out as LoongForge's single-pass VLM conversion writes it: the language model under
# foundation_model.*, the vision tower (32 blocks, 16 heads, Conv3d patch embedding) under
# encoder_model.image_encoder.* and its merger under encoder_model.image_projector.*, both in the
# first pipeline stage, split by ENCODER_TP (must divide TP and the tower's 16 heads).
# Qwen2.5-VL-7B: 28 layers, 28 heads in 4 query groups (TP<=4). Defaults: TP=4, ENCODER_TP=4,
# PP=2 over 12,16 layers (the first stage also holds the tower), TE names.
#   HF_CKPT_PATH=/models/Qwen2.5-VL-7B-Instruct MCORE_CKPT_PATH=/ckpt/qwen25vl-7b-mcore bash examples/qwen2_5_vl/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-4}" --encoder_tensor_model_parallel_size "${ENCODER_TP:-4}" \
  --pipeline_model_parallel_size "${PP:-2}" --custom_pipeline_layers "${PIPELINE_LAYERS:-12,16}" \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-8}" "$@"
