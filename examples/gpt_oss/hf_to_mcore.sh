#!/usr/bin/env bash
# gpt_oss (gpt-oss-120b; gpt-oss-20b with its own sizes): HuggingFace -> Megatron-Core.
# gpt-oss-120b: 36 layers, 64 heads in 8 query groups (TP<=8), 128 routed experts (top 4) whose
# weights OpenAI publishes in MXFP4: `--converter dequantize:if_quantized=true` turns them into
# bf16 on the way (a bf16 checkpoint passes unchanged). Defaults: TP=4, PP=4 over 9 layers each,
# EP=8 with whole experts (ETP=1: megatron-core builds expert biases only at ETP 1), TE
# grouped-GEMM names. gpt-oss-20b (24 layers, 32 experts): PIPELINE_LAYERS=6,6,6,6 EP=8.
#   HF_CKPT_PATH=/models/gpt-oss-120b MCORE_CKPT_PATH=/ckpt/gpt-oss-120b-mcore bash examples/gpt_oss/hf_to_mcore.sh
source "$(dirname "$0")/../common.sh"
hf_to_mcore \
  --tensor_model_parallel_size "${TP:-4}" --pipeline_model_parallel_size "${PP:-4}" \
  --custom_pipeline_layers "${PIPELINE_LAYERS:-9,9,9,9}" \
  --expert_parallel_size "${EP:-8}" --expert_tensor_parallel_size "${ETP:-1}" --moe-grouped-gemm \
  --converter dequantize:if_quantized=true \
  --transformer_impl "${TRANSFORMER_IMPL:-transformer_engine}" \
  --max_workers "${MAX_WORKERS:-16}" "$@"
