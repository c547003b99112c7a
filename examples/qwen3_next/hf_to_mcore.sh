#!/usr/bin/env bash
# qwen3_next (Qwen3-Next-80B-A3B; the Qwen3.5/3.6 text decoders, families qwen3_5 and
# qwen3_5_moe, take the same flags with their own sizes): HuggingFace (bf16) -> Megatron-Core.
# Qwen3-Next-80B-A3B: 48 layers, every 4th with gated full attention (16 heads in 2 query groups:
# TP<=2), the others gated delta-net (16 key / 32 value heads); 512 routed experts + a gated
# shared expert on every layer. Defaults: TP=2, PP=4 (12 layers each), EP=16 with whole experts
# (ETP=1), TE grouped-GEMM names. The layer pattern and the delta-net sizes are read from
# config.json (layer_types or full_attention_interval), the MTP head from mtp_num_hidden_layers.
#   HF_CKPT_PATH=/models/Qwen3-Next-80B-A3B-Instruct MCORE_CKPT_PATH=/ckpt/qwen3-next-mcore bash examples/qwen3_next/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-2}" --pipeline_model_parallel_size "${PP:-4}" \
  --custom_pipeline_layers "${PIPELINE_LAYERS:-12,12,12,12}" \
  --expert_parallel_size "${EP:-16}" --expert_tensor_parallel_size "${ETP:-1}" --moe-grouped-gemm \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-16}" "$@"
