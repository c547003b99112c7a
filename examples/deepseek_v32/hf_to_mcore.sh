#!/usr/bin/env bash
# deepseek_v32 (DeepSeek-V3.2, -Exp): HuggingFace -> Megatron-Core, DeepSeek-V3's layout (61 layers
# over 8,7,8,8,8,8,8,6 pipeline stages + 1 MTP layer, TP=8, 256 experts over EP=32, ETP=1, TE
# grouped-GEMM names) plus each layer's sparse-attention indexer under megatron-core's DSA names
# (self_attention.core_attention.indexer.*, whole on every TP rank). An FP8 source keeps its FP8
# blocks (add --quant_method pt, as examples/deepseek_v3/hf_fp8_to_mcore_fp8.sh does).
#   HF_CKPT_PATH=/models/DeepSeek-V3.2-Exp MCORE_CKPT_PATH=/ckpt/dsv32-mcore bash examples/deepseek_v32/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-8}" --pipeline_model_parallel_size "${PP:-8}" \
  --custom_pipeline_layers "${PIPELINE_LAYERS:-8,7,8,8,8,8,8,6}" \
  --expert_parallel_size "${EP:-32}" --expert_tensor_parallel_size "${ETP:-1}" --moe-grouped-gemm \
  --mtp_num_layers "${MTP_NUM_LAYERS:-1}" \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-16}" "$@"
