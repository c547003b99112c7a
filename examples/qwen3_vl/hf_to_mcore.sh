#!/usr/bin/env bash
# qwen3_vl (Qwen3-VL-8B-Instruct; 2B/4B/32B with their own sizes): HuggingFace (bf16) -> Megatron-Core,
# in LoongForge's single-pass VLM layout: the language model under foundation_model.*, the vision
# tower (27 LayerNorm blocks, 16 heads, position table, deepstack mergers) under
# encoder_model.image_encoder.*, its merger under encoder_model.image_projector.*, all in the first
# pipeline stage, the tower split by ENCODER_TP (must divide TP and the tower's 16 heads).
# Qwen3-VL-8B: 36 layers, 32 heads in 8 query groups (TP<=8). Defaults: TP=4, ENCODER_TP=4,
# PP=2 over 16,20 layers, TE names.
#   HF_CKPT_PATH=/models/Qwen3-VL-8B-Instruct MCORE_CKPT_PATH=/ckpt/qwen3vl-8b-mcore bash examples/qwen3_vl/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-4}" --encoder_tensor_model_parallel_size "${ENCODER_TP:-4}" \
  --pipeline_model_parallel_size "${PP:-2}" --custom_pipeline_layers "${PIPELINE_LAYERS:-16,20}" \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-8}" "$@"
