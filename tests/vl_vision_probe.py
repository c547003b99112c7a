"""The vision towers of converted Qwen2.5-VL / Qwen3-VL rank files in megatron-core: run in a
subprocess by tests/test_megatron_vl.py (``python vl_vision_probe.py JOBS.json WORLD_SIZE OUT_DIR``).

megatron-core 0.16.1 has no Qwen vision model, but the tower's blocks are plain transformer
layers: this builds megatron-core's own ``TransformerBlock`` (local spec, bidirectional
attention, the tower's norm, MLP and biases) at the job's tensor-parallel size, strict-loads each
rank file's ``encoder_model.image_encoder.decoder.*`` into it, and compares its output with
transformers' vision blocks on the same input (one full-attention sequence, rotary embedding at
angle 0, i.e. cos 1 / sin 0, which both sides then skip). Writes OUT_DIR/rank<r>.json: one
result per job.
"""
from __future__ import annotations

import json
import os
import sys

import torch

PREFIX = "encoder_model.image_encoder.decoder."


def _config(family: str, vision: dict, tp: int):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    qwen3 = family.startswith("qwen3_vl")
    return TransformerConfig(
        num_layers=vision["depth"], hidden_size=vision["hidden_size"], ffn_hidden_size=vision["intermediate_size"],
        num_attention_heads=vision["num_heads"], tensor_model_parallel_size=tp, add_bias_linear=True,
        add_qkv_bias=True, gated_linear_unit=not qwen3,
        activation_func=(lambda x: F.gelu(x, approximate="tanh")) if qwen3 else F.silu,
        normalization="LayerNorm" if qwen3 else "RMSNorm", layernorm_epsilon=1e-6, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, use_cpu_initialization=True, params_dtype=torch.float32)


def _hf_blocks(hf_dir: str, x: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    visual = model.model.visual
    n = x.shape[0]
    head_dim = visual.config.hidden_size // visual.config.num_heads
    angle0 = (torch.ones(n, head_dim), torch.zeros(n, head_dim))
    cu_seqlens = torch.tensor([0, n], dtype=torch.int32)
    with torch.no_grad():
        for block in visual.blocks:
            x = block(x, cu_seqlens=cu_seqlens, position_embeddings=angle0)
    return x


def _run(rank: int, world: int, port: int, jobs: list[dict], out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import mcore_harness as h

    h._apply_cpu_workarounds()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_block import TransformerBlock

    h._patch_megatron_after_import()
    results = []
    for index, job in enumerate(jobs):
        result = {"job": index, "rank": rank}
        try:
            tp = job["tp"]
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
            tensor_parallel.model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
            vision = json.load(open(os.path.join(job["hf_dir"], "config.json")))["vision_config"]
            spec = get_gpt_layer_local_spec()
            spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask  # a vision tower sees every patch
            block = TransformerBlock(_config(job["family"], vision, tp), spec, post_layer_norm=False)
            assert tp == 1 or ps.get_tensor_model_parallel_rank() == rank
            rank_dir = job["rank_dirs"][rank]
            ckpt = torch.load(os.path.join(job["mcore_dir"], "release", rank_dir, "model_optim_rng.pt"),
                              map_location="cpu", weights_only=False)
            sd = {k[len(PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(PREFIX)}
            h._strict_load(block, sd, f"{rank_dir} vision tower")
            x = torch.randn(16, vision["hidden_size"], generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ours = block(x.unsqueeze(1), attention_mask=None).squeeze(1)
            result.update(ok=True, loaded=len(sd), max_abs_diff=float((ours - _hf_blocks(job["hf_dir"], x)).abs().max()))
        except Exception as e:  # reported per job, the test fails on it
            result.update(ok=False, error=f"{type(e).__name__}: {e}")
        results.append(result)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    import torch.multiprocessing as mp

    jobs = json.load(open(sys.argv[1]))
    world = int(sys.argv[2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(world, port, jobs, sys.argv[3]), nprocs=world, join=True)
