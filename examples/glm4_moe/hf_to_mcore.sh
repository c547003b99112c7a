#!/usr/bin/env bash
# glm4_moe (GLM-4.5-Air; GLM-4.5 and GLM-4.6 with their own sizes): HuggingFace (bf16) -> Megatron-Core.
# GLM-4.5-Air: 46 layers (the first dense) + 1 MTP layer, 96 heads in 8 query groups (TP<=8),
# 128 routed experts + 1 shared. Defaults: TP=4, PP=4 over 12,12,12,10 layers (the last stage
# also holds the MTP layer), EP=8 with whole experts (ETP=1), TE grouped-GEMM names.
# GLM-4.5 (92 layers, 160 experts): PIPELINE_LAYERS=24,24,24,20 EP=16. Architecture and family
# are read from config.json (partial RoPE is recorded as Megatron's rotary_percent).
#   HF_CKPT_PATH=/models/GLM-4.5-Air MCORE_CKPT_PATH=/ckpt/glm45-air-mcore bash examples/glm4_moe/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-4}" --pipeline_model_parallel_size "${PP:-4}" \
  --custom_pipeline_layers "${PIPELINE_LAYERS:-12,12,12,10}" \
  --expert_parallel_size "${EP:-8}" --expert_tensor_parallel_size "${ETP:-1}" --moe-grouped-gemm \
  --mtp_num_layers "${MTP_NUM_LAYERS:-1}" \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-16}" "$@"
