"""Bit-exact HF -> MCore -> HF round trips over families and TP/PP/VPP layouts."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fixtures import load_hf_tensors
from helpers import assert_same_tensors, hf_to_mcore, mcore_to_hf, rank_files
from tiny_models import TinySpec

# (tp, pp, vpp, custom layer list) over 4-layer models
LAYOUTS = [
    (1, 1, 1, None),
    (2, 1, 1, None),
    (4, 1, 1, None),
    (1, 2, 1, None),
    (2, 2, 1, None),
    (1, 3, 1, None),          # balanced uneven: 2,1,1
    (2, 3, 1, "1,2,1"),      # custom uneven list
    (4, 2, 1, "3,1"),
    (2, 2, 2, None),          # VPP=2: 1 layer per chunk
    (1, 2, 2, "1,1,1,1"),
]
FAMILIES = [
    TinySpec("llama"),
    TinySpec("qwen2", tied=True),
    TinySpec("qwen2", tied=False),
    TinySpec("qwen3"),
    TinySpec("qwen3", tied=True, dtype=torch.bfloat16),
]


def _layout_id(layout):
    tp, pp, vpp, custom = layout
    return f"tp{tp}pp{pp}vpp{vpp}" + (f"-{custom.replace(',', '_')}" if custom else "")


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.key)
def test_round_trip_bit_exact(tiny_hf, tmp_path, spec, layout):
    tp, pp, vpp, custom = layout
    hf_dir = tiny_hf(spec)
    # Alternate the naming so both transformer implementations are round-tripped everywhere.
    impl = "local" if (tp + pp + vpp) % 2 else "transformer_engine"
    mcore = str(tmp_path / "mcore")
    back = str(tmp_path / "back")
    assert hf_to_mcore(hf_dir, mcore, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       **{"num-virtual-stages-per-pipeline-rank": vpp if vpp > 1 else None},
                       custom_pipeline_layers=custom, transformer_impl=impl) == 0
    files = rank_files(mcore)
    assert len(files) == tp * pp
    assert mcore_to_hf(mcore, back) == 0
    assert_same_tensors(load_hf_tensors(hf_dir), load_hf_tensors(back))
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf_dir, "config.json")))


def test_vocab_padding_and_tied_layout(tiny_hf, tmp_path):
    """Padded rows copy the last real row; tied PP=1 has no output_layer, PP>1 a copy on the last stage."""
    spec = TinySpec("qwen2", tied=True)
    hf = load_hf_tensors(tiny_hf(spec))
    emb = hf["model.embed_tokens.weight"]
    out1, out2 = str(tmp_path / "pp1"), str(tmp_path / "pp2")
    assert hf_to_mcore(tiny_hf(spec), out1, tensor_model_parallel_size=2, transformer_impl="local") == 0
    assert hf_to_mcore(tiny_hf(spec), out2, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                       make_vocab_size_divisible_by=64, transformer_impl="local") == 0
    f1 = rank_files(out1)
    assert all("output_layer.weight" not in f["model"] for f in f1.values())
    full = torch.cat([f1["mp_rank_00"]["model"]["embedding.word_embeddings.weight"],
                      f1["mp_rank_01"]["model"]["embedding.word_embeddings.weight"]])
    assert full.shape[0] == 256  # 250 padded to a multiple of 128 * TP
    assert torch.equal(full[:250], emb)
    assert torch.equal(full[250:], emb[-1:].expand(6, -1))
    f2 = rank_files(out2)
    last = torch.cat([f2["mp_rank_00_001"]["model"]["output_layer.weight"], f2["mp_rank_01_001"]["model"]["output_layer.weight"]])
    first = torch.cat([f2["mp_rank_00_000"]["model"]["embedding.word_embeddings.weight"], f2["mp_rank_01_000"]["model"]["embedding.word_embeddings.weight"]])
    assert last.shape[0] == 256 and torch.equal(last, first)
    assert "embedding.word_embeddings.weight" not in f2["mp_rank_00_001"]["model"]
    args = f2["mp_rank_00_000"]["args"]
    assert args.padded_vocab_size == 256 and args.vocab_size == 250 and args.untie_embeddings_and_output_weights is False


def test_vpp_chunks_and_local_numbering(tiny_hf, tmp_path):
    spec = TinySpec("llama", num_layers=6)
    hf = load_hf_tensors(tiny_hf(spec))
    out = str(tmp_path / "m")
    assert hf_to_mcore(tiny_hf(spec), out, pipeline_model_parallel_size=2,
                       **{"num-virtual-stages-per-pipeline-rank": 2}, custom_pipeline_layers="2,1,1,2",
                       transformer_impl="local") == 0
    files = rank_files(out)
    # virtual stages: rank0/chunk0 = layers 0-1, rank1/chunk0 = 2, rank0/chunk1 = 3, rank1/chunk1 = 4-5
    r0, r1 = files["mp_rank_00_000"], files["mp_rank_00_001"]
    assert set(r0) >= {"model0", "model1"} and "model" not in r0
    expect = {("mp_rank_00_000", "model0", 1): 1, ("mp_rank_00_001", "model0", 0): 2,
              ("mp_rank_00_000", "model1", 0): 3, ("mp_rank_00_001", "model1", 1): 5}
    for (rank, chunk, local), layer in expect.items():
        got = files[rank][chunk][f"decoder.layers.{local}.mlp.linear_fc2.weight"]
        assert torch.equal(got, hf[f"model.layers.{layer}.mlp.down_proj.weight"])
    assert "embedding.word_embeddings.weight" in r0["model0"]
    assert "output_layer.weight" in r1["model1"] and "decoder.final_layernorm.weight" in r1["model1"]


def test_qkv_interleave_matches_megatron_layout(tiny_hf, tmp_path):
    """linear_qkv rows per query group: [q heads of the group; k; v], groups split over TP."""
    spec = TinySpec("qwen2")
    hf = load_hf_tensors(tiny_hf(spec))
    out = str(tmp_path / "m")
    assert hf_to_mcore(tiny_hf(spec), out, tensor_model_parallel_size=2, transformer_impl="local") == 0
    d, r, groups_per_rank = 8, 2, 2  # head_dim, q heads per group, query groups per TP rank
    for rank in (0, 1):
        sd = rank_files(out)[f"mp_rank_0{rank}"]["model"]
        for suffix in ("weight", "bias"):
            q = hf[f"model.layers.0.self_attn.q_proj.{suffix}"]
            k = hf[f"model.layers.0.self_attn.k_proj.{suffix}"]
            v = hf[f"model.layers.0.self_attn.v_proj.{suffix}"]
            want = torch.cat([torch.cat([q[g * r * d:(g + 1) * r * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                              for g in range(rank * groups_per_rank, (rank + 1) * groups_per_rank)])
            assert torch.equal(sd[f"decoder.layers.0.self_attention.linear_qkv.{suffix}"], want)
        gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
        assert torch.equal(sd["decoder.layers.0.mlp.linear_fc1.weight"],
                           torch.cat([gate[rank * 64:(rank + 1) * 64], up[rank * 64:(rank + 1) * 64]]))


def test_max_workers_and_hf_shards(tiny_hf, tmp_path):
    """A process pool gives identical files; a small shard cap splits the HF output with an index."""
    spec = TinySpec("llama")
    a, b, back = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "back")
    assert hf_to_mcore(tiny_hf(spec), a, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    assert hf_to_mcore(tiny_hf(spec), b, tensor_model_parallel_size=2, pipeline_model_parallel_size=2, max_workers=2) == 0
    fa, fb = rank_files(a), rank_files(b)
    for rank in fa:
        for k, v in fa[rank]["model"].items():
            assert (v is None and fb[rank]["model"][k] is None) or torch.equal(v, fb[rank]["model"][k])
    assert mcore_to_hf(a, back, max_shard_size="200KB", max_workers=2) == 0
    shards = sorted(f for f in os.listdir(back) if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert_same_tensors(load_hf_tensors(tiny_hf(spec)), load_hf_tensors(back))
