#!/bin/bash
# DeepSeek-V3.1 as published (block FP8) -> Megatron-Core FP8 parameters, TP=8 PP=8 EP=32 ETP=1,
# written the way LoongForge's documentation writes it: only the LOAD and SAVE lines need editing.
# LOONGFORGE_PATH may point at a LoongForge tree (its YAMLs) or at this checkout.

LOONGFORGE_PATH=${LOONGFORGE_PATH:-/workspace/LoongForge}
MEGATRON_PATH=${MEGATRON_PATH:-/workspace/Megatron-LM}

LOAD=/mnt/models/DeepSeek-V3.1
SAVE=/mnt/checkpoints/DeepSeek-V3.1-tp8-pp8-ep32-fp8

MODEL_CONFIG_FILE=${LOONGFORGE_PATH}/configs/models/deepseek3/deepseek_v3.yaml
CONVERT_FILE=${LOONGFORGE_PATH}/configs/models/deepseek3/ckpt_convert/deepseek_v3_convert.yaml

python ${LOONGFORGE_PATH}/tools/convert_checkpoint/module_convertor/model.py \
    --load_platform=huggingface \
    --save_platform=mcore \
    --megatron_path=${MEGATRON_PATH} \
    --config_file=${MODEL_CONFIG_FILE} \
    --convert_file=${CONVERT_FILE} \
    --tensor_model_parallel_size=8 \
    --pipeline_model_parallel_size=8 \
    --expert_parallel_size=32 \
    --expert_tensor_parallel_size=1 \
    --custom_pipeline_layers=8,7,8,8,8,8,8,6 \
    --load_ckpt_path=${LOAD} \
    --save_ckpt_path=${SAVE} \
    --safetensors \
    --no_save_optim \
    --no_load_optim \
    --max_workers=32 \
    --moe-grouped-gemm \
    --amax_epsilon=1e-12
