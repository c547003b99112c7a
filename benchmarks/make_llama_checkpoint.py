#!/usr/bin/env python
"""Write a Llama-shaped bf16 HuggingFace checkpoint of random weights, shard by shard.

No model is instantiated: tensor names and shapes follow ``LlamaForCausalLM`` and each
shard's tensors are generated, saved and freed before the next shard, so peak memory is
about one shard (plus safetensors' serialisation buffer), not the whole checkpoint.

    python benchmarks/make_llama_checkpoint.py OUT_DIR [--size-gb 3] [--shard-gb 1]
    python benchmarks/make_llama_checkpoint.py OUT_DIR --shape llama3-8b --shard-gb 5   # 16.06 GB, 4 shards
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

GB = 10**9  # decimal, like HF's max_shard_size="1GB"
DTYPE = torch.bfloat16



@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int | None = None  # None: as many as the requested size takes

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    # A TinyLlama / Llama-3.2-1B-like width: head_dim 128 with GQA (2 query heads per KV head).
    "small": Shape(hidden=2048, ffn=5632, heads=16, kv_heads=8, vocab=32000),
    # Meta-Llama-3-8B: 32 layers, GQA 32/8, untied 128256-token embedding and head (16.06 GB).
    "llama3-8b": Shape(hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256, layers=32),
}


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE.itemsize
        for s in self.shape:
            n *= s
        return n


def layer_specs(i: int, shape: Shape) -> list[Spec]:
    p = f"model.layers.{i}."
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return [
        Spec(p + "input_layernorm.weight", (h,)),
        Spec(p + "self_attn.q_proj.weight", (q, h)),
        Spec(p + "self_attn.k_proj.weight", (kv, h)),
        Spec(p + "self_attn.v_proj.weight", (kv, h)),
        Spec(p + "self_attn.o_proj.weight", (h, q)),
        Spec(p + "post_attention_layernorm.weight", (h,)),
        Spec(p + "mlp.gate_proj.weight", (shape.ffn, h)),
        Spec(p + "mlp.up_proj.weight", (shape.ffn, h)),
        Spec(p + "mlp.down_proj.weight", (h, shape.ffn)),
    ]


def num_layers_for(size_bytes: int, shape: Shape) -> int:
    """Layer count whose total size is nearest ``size_bytes``; kept even so PP=2 splits evenly."""
    if shape.layers is not None:
        return shape.layers
    fixed = 2 * shape.vocab * shape.hidden * DTYPE.itemsize + shape.hidden * DTYPE.itemsize  # embed + lm_head + final norm
    per_layer = sum(s.nbytes for s in layer_specs(0, shape))
    layers = round((size_bytes - fixed) / per_layer / 2) * 2
    return max(layers, 2)


def all_specs(num_layers: int, shape: Shape) -> list[Spec]:
    specs = [Spec("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    for i in range(num_layers):
        specs += layer_specs(i, shape)
    specs += [Spec("model.norm.weight", (shape.hidden,)), Spec("lm_head.weight", (shape.vocab, shape.hidden))]
    return specs


def split_shards(specs: list[Spec], shard_bytes: int) -> list[list[Spec]]:
    """Greedy in-order packing, like transformers' ``save_pretrained`` sharding."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def hf_config(num_layers: int, shape: Shape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "num_hidden_layers": num_layers,
        "vocab_size": shape.vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def write_checkpoint(out_dir: str, size_gb: float = 3.0, shard_gb: float = 1.0, seed: int = 0,
                     shape: Shape = SHAPES["small"]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    if any(f.endswith(".safetensors") for f in os.listdir(out_dir)):
        raise SystemExit(f"{out_dir} already holds safetensors files; pick an empty directory")
    num_layers = num_layers_for(int(size_gb * GB), shape)
    shards = split_shards(all_specs(num_layers, shape), int(shard_gb * GB))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for file, specs in zip(names, shards):
        # Random (not constant) values, so a round-trip check catches any misplaced slice.
        tensors = {s.name: torch.randn(s.shape, generator=gen, dtype=DTYPE) for s in specs}
        path = os.path.join(out_dir, file)
        save_file(tensors, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        for s in specs:
            weight_map[s.name] = file
            total += s.nbytes
        del tensors
        print(f"  wrote {file} ({os.path.getsize(path) / GB:.2f} GB, {len(specs)} tensors)", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    # config.json last: a directory that has it is complete.
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(num_layers, shape), f, indent=2)
    print(f"{out_dir}: {num_layers} layers, {total / GB:.2f} GB in {len(shards)} shards", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--size-gb", type=float, default=3.0, help="target total size in GB (1e9 bytes)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="safetensors shard cap in GB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small",
                    help="layer widths; llama3-8b has a fixed 32 layers and ignores --size-gb")
    args = ap.parse_args(argv)
    write_checkpoint(args.out_dir, args.size_gb, args.shard_gb, args.seed, SHAPES[args.shape])


if __name__ == "__main__":
    main()
