#!/usr/bin/env bash
# deepseek_v2_lite: HuggingFace -> Megatron-Core legacy checkpoint. MLA without q-LoRA,
# 27 layers (the first dense) over PP=2 as 13,14; 64 routed experts over EP=8 (ETP=1),
# 2 shared experts split by TP=2; local (non-TE) spec names.
#   HF_CKPT_PATH=/models/DeepSeek-V2-Lite MCORE_CKPT_PATH=/ckpt/dsv2-lite-mcore bash examples/deepseek_v2_lite/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-2}" --pipeline_model_parallel_size "${PP:-2}" \
  --custom_pipeline_layers "${PIPELINE_LAYERS:-13,14}" \
  --expert_parallel_size "${EP:-8}" --expert_tensor_parallel_size "${ETP:-1}" \
  --transformer_impl "${TRANSFORMER_IMPL:-local}" \
  --max_workers "${MAX_WORKERS:-4}" "$@"
