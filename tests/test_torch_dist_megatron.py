"""torch_dist checkpoints against a real megatron-core GPTModel on CPU (gloo), both ways.

* Megatron loads what we write: HF -> torch_dist (written once, layout-free), then every job
  builds the model at a parallel layout the converter was never told (TP2 PP2, VPP, EP2, ...),
  loads through ``dist_checkpointing.load`` with ``StrictHandling.RAISE_ALL`` and a strict
  ``load_state_dict``, and compares logits (and DeepSeek's MTP logits) with transformers.
* We read what Megatron writes: rank files loaded into megatron-core at TP2 PP2 / EP2 / VPP are
  saved by megatron-core's own ``dist_checkpointing.save`` (once with an Adam optimizer's state);
  the converter turns that into HF, which must equal the source HF weights bit for bit.

Spawning costs about 3 s per process here, so every job runs in ONE spawn of 4 workers.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from fixtures import load_hf_tensors
from helpers import assert_same_tensors, convert, hf_to_mcore, mcore_to_hf
from mcore_harness import CheckJob, Layout, assert_all_ok, job_problems, run_checks
from tiny_models import TinySpec

WORLD_SIZE = 4
SPECS = {
    "llama": TinySpec("llama"),
    "qwen3": TinySpec("qwen3", tied=True),
    "qwen3_moe": TinySpec("qwen3_moe"),
    # dense layers 0 and 2: megatron-core keys every layer on its own (moe_layer_freq is a list)
    "qwen3_moe_dense": TinySpec("qwen3_moe", mlp_only_layers=(0, 2)),
    "v3": TinySpec("deepseek_v3", mtp_layers=1),  # MLA, dense first layer, shared experts, MTP
    "qwen2_moe": TinySpec("qwen2_moe", mlp_only_layers=(1,)),  # shared expert with a sigmoid gate
}

# (model, --transformer_impl of our output, the layout megatron loads it at, the padded vocab
# megatron builds with when it differs from the one written: as at a larger TP)
LOADS = [
    ("llama", "local", Layout(2, 2, 1, (2, 2)), None),
    ("llama", "transformer_engine", Layout(1, 2, 2, (1, 1, 1, 1)), None),  # dense TE keys = the local spec's
    ("llama", "local", Layout(2, 1, 1, (4,)), 512),  # 256 rows written, 512 built: allow_shape_mismatch
    ("qwen3", "local", Layout(4, 1, 1, (4,)), None),
    ("qwen3", "transformer_engine", Layout(2, 2, 1, (3, 1)), None),  # tied embeddings over two stages
    ("qwen3_moe", "local", Layout(2, 1, 1, (4,), ep=2), None),
    ("qwen3_moe_dense", "local", Layout(1, 2, 1, (2, 2), ep=2), None),
    ("v3", "local", Layout(1, 2, 1, (2, 2), ep=2), None),
    ("v3", "local", Layout(2, 1, 1, (4,), ep=2, etp=1), None),
    ("qwen2_moe", "local", Layout(2, 1, 1, (4,), ep=2), None),
]
# (model, the layout megatron-core saves at: rank files converted at it, loaded, then saved;
# whether the optimizer state is saved too)
SAVES = [
    ("llama", Layout(2, 2, 1, (2, 2)), True),
    ("qwen3_moe", Layout(2, 1, 1, (4,), ep=2), False),
    ("qwen3_moe_dense", Layout(1, 2, 1, (2, 2), ep=2), False),
    ("v3", Layout(1, 2, 1, (2, 2), ep=2), False),
    ("qwen3", Layout(1, 2, 2, (1, 1, 1, 1)), False),  # tied embeddings, interleaved pipeline
]


def _swap_layer_chunks(src: str, dst: Path, key: str) -> str:
    """A copy whose .metadata points layer 0's chunk of ``key`` at layer 1's bytes and back:
    keys and shapes stay valid, only the logits can tell."""
    shutil.copytree(src, dst)
    path = dst / "release" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    index = {(i.fqn, tuple(i.offset)): i for i in metadata.storage_data if i.fqn == key}
    a, b = index[(key, (0, 0, 0))], index[(key, (1, 0, 0))]
    metadata.storage_data[a], metadata.storage_data[b] = metadata.storage_data[b], metadata.storage_data[a]
    path.write_bytes(pickle.dumps(metadata))
    return str(dst)


@pytest.fixture(scope="module")
def spawned(tiny_hf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torch_dist_megatron")
    hf = {name: tiny_hf(spec) for name, spec in SPECS.items()}
    jobs, written = [], {}
    for model, impl, layout, padded in LOADS:
        out = written.get((model, impl))
        if out is None:
            out = written[(model, impl)] = str(tmp / f"dist_{model}_{impl}")
            assert hf_to_mcore(hf[model], out, ckpt_format="torch_dist", transformer_impl=impl,
                               max_shard_size="200KB", max_workers=2) == 0
        jobs.append(CheckJob(hf[model], out, layout, check_logits=True, tied=SPECS[model].tied,
                             ckpt_format="torch_dist", padded_vocab=padded))
    negative = CheckJob(hf["llama"], _swap_layer_chunks(written[("llama", "local")], tmp / "swapped",
                                                        "decoder.layers.mlp.linear_fc2.weight"),
                        LOADS[0][2], check_logits=True, ckpt_format="torch_dist")
    saves = []
    for i, (model, layout, optimizer) in enumerate(SAVES):
        legacy = str(tmp / f"legacy_{i}")
        assert hf_to_mcore(hf[model], legacy, tensor_model_parallel_size=layout.tp,
                           pipeline_model_parallel_size=layout.pp, expert_parallel_size=layout.ep,
                           transformer_impl="local",
                           **{"num-virtual-stages-per-pipeline-rank": layout.vpp if layout.vpp > 1 else None}) == 0
        saves.append(CheckJob(hf[model], legacy, layout, tied=SPECS[model].tied,
                              save_torch_dist=str(tmp / f"megatron_saved_{i}"), save_optimizer=optimizer))
    all_jobs = [*jobs, negative, *saves]
    return hf, jobs, negative, saves, run_checks(WORLD_SIZE, all_jobs), tmp


def test_megatron_loads_our_torch_dist_at_other_layouts(spawned):
    _, jobs, _, _, results, _ = spawned
    assert_all_ok([r for r in results if r["job"] < len(jobs)], jobs, WORLD_SIZE)
    for index, job in enumerate(jobs):
        diffs = [r["max_abs_diff"] for r in results if r["job"] == index and r["max_abs_diff"] is not None]
        assert len(diffs) == 1 and diffs[0] <= 1e-4, (index, diffs)
        if job.arch().mtp_layers:
            mtp = [r["mtp_max_abs_diff"] for r in results if r["job"] == index and r["mtp_max_abs_diff"] is not None]
            assert len(mtp) == 1 and mtp[0] <= 1e-4, (index, mtp)


def test_swapped_chunks_are_caught_by_the_logits(spawned):
    _, jobs, negative, _, results, _ = spawned
    problems = job_problems(results, [*jobs, negative], WORLD_SIZE)
    assert sorted(problems) == [len(jobs)], problems
    assert "logits max|diff|" in "\n".join(problems[len(jobs)])


def test_what_megatron_saves_converts_to_the_source_weights(spawned, capsys):
    hf, jobs, _, saves, results, tmp = spawned
    first = len(jobs) + 1
    assert_all_ok([{**r, "job": r["job"] - first} for r in results if r["job"] >= first], saves, WORLD_SIZE)
    for i, ((model, _, optimizer), job) in enumerate(zip(SAVES, saves)):
        assert job.save_torch_dist is not None
        assert (Path(job.save_torch_dist) / "release" / ".metadata").is_file()
        out = str(tmp / f"back_{i}")
        capsys.readouterr()
        # megatron's own save holds no args: the architecture comes from the HF config
        assert mcore_to_hf(job.save_torch_dist, out, hf_config_path=hf[model]) == 0
        assert_same_tensors(load_hf_tensors(hf[model]), load_hf_tensors(out))
        # Adam's exp_avg and exp_avg_sq of each of Llama's 9 keys, skipped and said
        said = "holds 18 optimizer-state entries: skipped, only the model weights are read"
        assert (said in capsys.readouterr().err) == optimizer, model


def test_megatron_saved_torch_dist_to_legacy_and_back(spawned):
    """torch_dist (megatron's) -> legacy rank files at TP2 EP2 -> HF: bit-exact."""
    hf, _, _, saves, _, tmp = spawned
    job = saves[1]
    assert job.save_torch_dist is not None
    legacy, back = str(tmp / "to_legacy"), str(tmp / "to_legacy_hf")
    assert convert("--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", job.save_torch_dist,
                   "--save_ckpt_path", legacy, hf_config_path=hf["qwen3_moe"], tensor_model_parallel_size=2,
                   expert_parallel_size=2) == 0
    assert mcore_to_hf(legacy, back) == 0
    a, b = load_hf_tensors(hf["qwen3_moe"]), load_hf_tensors(back)
    assert_same_tensors(a, b)
    assert all(t.dtype == torch.float32 for t in b.values())


def _schema(path: str) -> dict[str, tuple]:
    """Key -> (global shape, dtype) of tensors, or "bytes" of objects, in a torch_dist .metadata."""
    md = pickle.loads((Path(path) / "release" / ".metadata").read_bytes())
    return {k: (tuple(m.size), m.properties.dtype) if hasattr(m, "size") else "bytes"
            for k, m in md.state_dict_metadata.items() if not k.startswith("optimizer.")}


def test_our_keys_and_shapes_are_megatrons(spawned):
    """What we write for the local spec has exactly the keys, global shapes, dtypes and
    _extra_state objects of megatron-core's own save of the same model."""
    hf, _, _, saves, _, tmp = spawned
    for i, ((model, _, _), job) in enumerate(zip(SAVES, saves)):
        assert job.save_torch_dist is not None
        ours = str(tmp / f"ours_{i}")
        assert hf_to_mcore(hf[model], ours, ckpt_format="torch_dist", transformer_impl="local") == 0
        theirs = _schema(job.save_torch_dist)
        mine = _schema(ours)
        assert sorted(set(theirs) ^ set(mine)) == [], model
        assert mine == theirs, model
