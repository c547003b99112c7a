# Shared by the per-model example scripts: required paths and the converter call.
# A script sources this file, then calls `hf_to_mcore <its flags> "$@"` or `mcore_to_hf <its flags> "$@"`.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

convert_checkpoint() {
  "$PYTHON" "$REPO/tools/convert_checkpoint/module_convertor/model.py" "$@"
}

hf_to_mcore() {
  : "${HF_CKPT_PATH:?set HF_CKPT_PATH to the HuggingFace checkpoint directory}"
  : "${MCORE_CKPT_PATH:?set MCORE_CKPT_PATH to an empty output directory}"
  convert_checkpoint --load_platform huggingface --save_platform mcore \
    --load_ckpt_path "$HF_CKPT_PATH" --save_ckpt_path "$MCORE_CKPT_PATH" \
    --make_vocab_size_divisible_by 128 --safetensors "$@"
}

# TP/PP/VPP, EP/ETP, the layer split, naming and MTP layers are read off the rank files.
# HF_REFERENCE_PATH (optional): the original HF directory; its config, generation config,
# tokenizer (and any modeling code) files are copied.
mcore_to_hf() {
  : "${MCORE_CKPT_PATH:?set MCORE_CKPT_PATH to the Megatron checkpoint directory}"
  : "${HF_CKPT_PATH:?set HF_CKPT_PATH to an empty output directory}"
  local extra=()
  if [ -n "${HF_REFERENCE_PATH:-}" ]; then extra+=(--hf_config_path "$HF_REFERENCE_PATH"); fi
  convert_checkpoint --load_platform mcore --save_platform huggingface \
    --load_ckpt_path "$MCORE_CKPT_PATH" --save_ckpt_path "$HF_CKPT_PATH" \
    --max_shard_size 5GB --safetensors "${extra[@]}" "$@"
}
