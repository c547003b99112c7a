#!/usr/bin/env bash
# deepseek_v2_lite: HuggingFace -> Megatron-Core legacy checkpoint. MLA without q-LoRA,
# 27 layers (the first dense) over PP=2 as 13,14; 64 routed experts over EP=8 (ETP=1),
# 2 shared experts split by TP=2; local (non-TE) spec names.
#   HF_CKPT_PATH=/models/DeepSeek-V2-Lite MCORE_CKPT_PATH=/ckpt/dsv2-lite-mcore bash examples/deepseek_v2_lite/hf_to_mcore.sh
set -euo pipefail
: "${HF_CKPT_PATH:?set HF_CKPT_PATH to the HuggingFace checkpoint directory}"
: "${MCORE_CKPT_PATH:?set MCORE_CKPT_PATH to an empty output directory}"
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python}
"$PYTHON" "$REPO/tools/convert_checkpoint/module_convertor/model.py" \
  --load_platform huggingface --save_platform mcore \
  --load_ckpt_path "$HF_CKPT_PATH" --save_ckpt_path "$MCORE_CKPT_PATH" \
  --tensor_model_parallel_size "${TP:-2}" --pipeline_model_parallel_size "${PP:-2}" \
  --custom_pipeline_layers "${PIPELINE_LAYERS:-13,14}" \
  --expert_parallel_size "${EP:-8}" --expert_tensor_parallel_size "${ETP:-1}" \
  --transformer_impl "${TRANSFORMER_IMPL:-local}" \
  --make_vocab_size_divisible_by 128 --safetensors \
  --max_workers "${MAX_WORKERS:-4}" "$@"
