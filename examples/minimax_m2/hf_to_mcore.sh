#!/usr/bin/env bash
# minimax_m2 (MiniMax-M2): HuggingFace -> Megatron-Core. 62 layers, every one MoE (256 experts,
# w1/w3/w2), 48 heads in 8 query groups (TP<=8), full-width q/k norms kept whole on every TP
# rank. Defaults: TP=4, PP=4 over 16,16,16,14 layers, EP=16 with whole experts (ETP=1), TE
# grouped-GEMM names. The published FP8 checkpoint (128x128 blocks) keeps its FP8 tensors
# (attention and expert matrices) as TE FP8 parameters, as for DeepSeek-V3.
#   HF_CKPT_PATH=/models/MiniMax-M2 MCORE_CKPT_PATH=/ckpt/minimax-m2-mcore bash examples/minimax_m2/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-4}" --pipeline_model_parallel_size "${PP:-4}" \
  --custom_pipeline_layers "${PIPELINE_LAYERS:-16,16,16,14}" \
  --expert_parallel_size "${EP:-16}" --expert_tensor_parallel_size "${ETP:-1}" --moe-grouped-gemm \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-16}" "$@"
