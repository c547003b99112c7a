"""torch_dist checkpoints without megatron-core: round trips, the files written, bad input,
optimizer state, workers and resume (megatron-core itself: test_torch_dist_megatron.py)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from fixtures import assert_fails, load_hf_tensors, read_tree
from helpers import assert_same_tensors, convert, hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec

from convert_checkpoint.cli import main
from convert_checkpoint.errors import ConversionError
from convert_checkpoint.formats import dcp
from convert_checkpoint.manifest import MANIFEST_NAME

LLAMA = TinySpec("llama")
QWEN3_MOE_BF16 = TinySpec("qwen3_moe", dtype=torch.bfloat16, tied=True)
QWEN3_MOE_DENSE = TinySpec("qwen3_moe", mlp_only_layers=(0, 2))
V3 = TinySpec("deepseek_v3", mtp_layers=1)
KEEP_OUT = {MANIFEST_NAME, "conversion_report.json"}  # their contents record paths and timings


def to_dist(hf: str, out: str, **flags) -> None:
    assert hf_to_mcore(hf, out, ckpt_format="torch_dist", **flags) == 0


def mcore_to_mcore(src: str, out: str, **flags) -> int:
    return convert("--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", src,
                   "--save_ckpt_path", out, **flags)


def metadata(path: str):
    return pickle.loads(Path(path, "release", ".metadata").read_bytes())


def save_metadata(path: str, md) -> None:
    Path(path, "release", ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("spec", [LLAMA, QWEN3_MOE_BF16, V3], ids=["llama", "qwen3_moe_bf16_tied", "deepseek_v3_mtp"])
def test_round_trips_are_bit_exact(tiny_hf, tmp_path, spec):
    """HF -> torch_dist -> HF; torch_dist -> legacy -> HF; legacy -> torch_dist -> torch_dist (other
    naming) -> HF: every tensor equal, dtypes included."""
    hf = tiny_hf(spec)
    want = load_hf_tensors(hf)
    dist, legacy, dist2, dist3 = (str(tmp_path / n) for n in ("dist", "legacy", "dist2", "dist3"))
    to_dist(hf, dist, transformer_impl="local", max_shard_size="150KB", max_workers=2)
    assert len(list(Path(dist, "release").glob("__0_*.distcp"))) > 1
    assert mcore_to_hf(dist, str(tmp_path / "a")) == 0
    assert_same_tensors(want, load_hf_tensors(str(tmp_path / "a")))
    assert mcore_to_mcore(dist, legacy, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    assert Path(legacy, "release", "mp_rank_01_001", "model_optim_rng.pt").is_file()
    assert mcore_to_hf(legacy, str(tmp_path / "b")) == 0
    assert_same_tensors(want, load_hf_tensors(str(tmp_path / "b")))
    assert mcore_to_mcore(legacy, dist2, ckpt_format="torch_dist") == 0
    assert mcore_to_mcore(dist2, dist3, ckpt_format="torch_dist", transformer_impl="local") == 0
    assert mcore_to_hf(dist3, str(tmp_path / "c")) == 0
    assert_same_tensors(want, load_hf_tensors(str(tmp_path / "c")))
    assert main(["verify", hf, dist3]) == 0


@pytest.mark.parametrize("family", ["glm4_moe", "minimax_m2", "deepseek_v32"])
def test_newer_families_round_trip(tiny_hf, tmp_path, family):
    """The families added after torch_dist (GLM's q/k/v biases and MTP, MiniMax's whole q/k
    norms and router bias, V3.2's indexer) go HF -> torch_dist (TP2, EP2) -> HF unchanged."""
    hf = tiny_hf(TinySpec(family, dtype=torch.bfloat16))
    dist = str(tmp_path / "dist")
    to_dist(hf, dist, tensor_model_parallel_size=2, expert_parallel_size=2)
    assert mcore_to_hf(dist, str(tmp_path / "back")) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(str(tmp_path / "back")))


def test_the_files_written(tiny_hf, tmp_path):
    """Release directory and tracker, the four metadata.json keys, common.pt, per-layer keys
    when the layer kinds vary, fc1 as gate and up chunks, experts on their own axis, one
    ``[None]`` object per _extra_state shard."""
    out = str(tmp_path / "dist")
    to_dist(tiny_hf(QWEN3_MOE_DENSE), out, transformer_impl="local", tensor_model_parallel_size=2)
    assert Path(out, "latest_checkpointed_iteration.txt").read_text() == "release"
    assert json.loads(Path(out, "release", "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}
    common = torch.load(Path(out, "release", "common.pt"), weights_only=False)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    assert common["args"].tensor_model_parallel_size == 2 and common["args"].ckpt_format == "torch_dist"
    assert common["args"].padded_vocab_size == 256
    md = metadata(out)
    state = md.state_dict_metadata
    fc1 = state["decoder.layers.0.mlp.linear_fc1.weight"]  # dense layer 0, its own key
    assert list(fc1.size) == [256, 64] and [list(c.offsets) for c in fc1.chunks] == [[0, 0], [128, 0]]
    experts = state["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]
    assert list(experts.size) == [4, 64, 64] and len(experts.chunks) == 8
    assert list(state["embedding.word_embeddings.weight"].size) == [256, 64]
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in state  # the local spec's name on a MoE layer
    assert not any(k.startswith("decoder.layers.self_attention") for k in state)  # nothing stacked
    extra = [k for k in state if "_extra_state" in k]
    assert "decoder.layers.1.mlp.experts.experts.linear_fc2._extra_state/shard_3_4" in extra
    index = md.storage_data[MetadataIndex(extra[0])]
    blob = Path(out, "release", index.relative_path).read_bytes()[index.offset:index.offset + index.length]
    assert torch.load(__import__("io").BytesIO(blob), weights_only=True) == [None]
    # The same model with every layer MoE is stacked: a layer axis, then an expert axis.
    stacked = str(tmp_path / "stacked")
    to_dist(tiny_hf(QWEN3_MOE_BF16), stacked)
    state = metadata(stacked).state_dict_metadata
    assert list(state["decoder.layers.mlp.experts.experts.linear_fc1.weight"].size) == [4, 4, 64, 64]
    assert state["decoder.layers.mlp.experts.experts.linear_fc1.weight"].properties.dtype == torch.bfloat16
    assert "decoder.layers.pre_mlp_layernorm.weight" in state  # TE keeps it on MoE layers
    assert "decoder.layers.self_attention.linear_proj._extra_state/shard_3_4" in state
    assert "output_layer.weight" not in state  # tied


def test_the_writer_checks_coverage_before_metadata():
    entry = dcp.TensorEntry(torch.float32, (4, 2), (((0, 0), (2, 2)), ((2, 0), (2, 2))))
    record = dcp.BlobRecord("w", (0, 0), (2, 2), 0, 10)
    with pytest.raises(ConversionError, match=r"tensor w: the chunk at \[2, 0\] is in no data file"):
        dcp.build_metadata({"w": entry}, [], {"__0_0.distcp": [record]})
    overlapping = dcp.TensorEntry(torch.float32, (4, 2), (((0, 0), (2, 2)), ((1, 0), (2, 2))))
    records = [record, dcp.BlobRecord("w", (1, 0), (2, 2), 10, 10)]
    with pytest.raises(ConversionError, match="tensor w: chunks at .* overlap; .metadata not written"):
        dcp.build_metadata({"w": overlapping}, [], {"__0_0.distcp": records})
    assert dcp.tiling_problem((4, 2), [((0, 0), (2, 2)), ((2, 0), (2, 2))]) is None
    assert "gap" in dcp.tiling_problem((4, 2), [((0, 0), (2, 2)), ((2, 0), (1, 2))])
    assert "outside" in dcp.tiling_problem((4, 2), [((0, 0), (5, 2))])


def _damaged(tiny_hf, tmp_path, how: str) -> str:
    out = str(tmp_path / "dist")
    to_dist(tiny_hf(LLAMA), out, max_shard_size="150KB")
    md = metadata(out)
    key = "decoder.layers.mlp.linear_fc2.weight"
    chunks = md.state_dict_metadata[key].chunks
    if how == "gap":
        del chunks[2]
    elif how == "overlap":
        chunks[1] = ChunkStorageMetadata(torch.Size([0, 0, 0]), chunks[1].sizes)
    elif how == "truncated":
        last = max(Path(out, "release").glob("__0_*.distcp"))
        with open(last, "r+b") as f:
            f.truncate(last.stat().st_size // 2)
    elif how == "missing":
        next(Path(out, "release").glob("__0_1.distcp")).unlink()
    elif how == "singleton":  # megatron-core 0.15.0rc1's per-shard keys
        fc1 = "decoder.layers.mlp.linear_fc1.weight"
        md.state_dict_metadata[fc1 + "_w"] = md.state_dict_metadata.pop(fc1)
    save_metadata(out, md)
    return out


@pytest.mark.parametrize("how,fragments", [
    ("gap", ["tensor decoder.layers.mlp.linear_fc2.weight", "a gap"]),
    ("overlap", ["tensor decoder.layers.mlp.linear_fc2.weight", "overlap"]),
    ("truncated", ["is truncated", ".distcp"]),
    ("missing", ["data file __0_1.distcp is missing"]),
    ("singleton", ["tensor decoder.layers.mlp.linear_fc1.weight_w", "singleton_local_shards"]),
])
def test_a_damaged_checkpoint_is_refused_with_one_line(tiny_hf, tmp_path, capsys, how, fragments):
    src = _damaged(tiny_hf, tmp_path, how)
    capsys.readouterr()
    out = str(tmp_path / "out")
    assert_fails(capsys, mcore_to_hf(src, out), out, *fragments)


def test_optimizer_state_is_skipped_and_said(tiny_hf, tmp_path, capsys):
    out = str(tmp_path / "dist")
    to_dist(tiny_hf(LLAMA), out)
    md = metadata(out)
    # fully_reshardable optimizer state: model-space tensors under optimizer.state.<kind>.<key>
    key = "decoder.layers.mlp.linear_fc2.weight"
    for kind in ("exp_avg", "exp_avg_sq"):
        name = f"optimizer.state.{kind}.{key}"
        md.state_dict_metadata[name] = md.state_dict_metadata[key]
        for index, info in list(md.storage_data.items()):
            if index.fqn == key:
                md.storage_data[MetadataIndex(name, index.offset)] = info
    save_metadata(out, md)
    capsys.readouterr()
    assert mcore_to_hf(out, str(tmp_path / "hf")) == 0
    assert "holds 2 optimizer-state entries: skipped, only the model weights are read" in capsys.readouterr().err
    assert_same_tensors(load_hf_tensors(tiny_hf(LLAMA)), load_hf_tensors(str(tmp_path / "hf")))


def test_flags(tiny_hf, tmp_path, capsys):
    out = str(tmp_path / "out")
    tiny_hf(LLAMA)
    capsys.readouterr()
    rc = convert("--load_platform", "mcore", "--save_platform", "huggingface", "--load_ckpt_path", tiny_hf(LLAMA),
                 "--save_ckpt_path", out, **{"ckpt-format": "torch_dist"})
    assert_fails(capsys, rc, out, "--ckpt_format torch_dist", "--save_platform mcore")
    rc = convert("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", tiny_hf(LLAMA),
                 "--save_ckpt_path", out, ckpt_format="torch_dist", convert_to_fp8=True)
    assert_fails(capsys, rc, out, "--convert_to_fp8", "dequantized")
    to_dist(tiny_hf(LLAMA), out, **{"dry_run": True})
    assert "torch_dist: 9 tensors" in capsys.readouterr().out
    assert not os.path.exists(out) or not os.listdir(out)


def _cli(src: str, out: str, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CONVERT_CHECKPOINT_FAULT"}
    if fault:
        env["CONVERT_CHECKPOINT_FAULT"] = fault
    cmd = [sys.executable, "-m", "convert_checkpoint", "--load_platform", "huggingface", "--save_platform", "mcore",
           "--ckpt_format", "torch_dist", "--load_ckpt_path", src, "--save_ckpt_path", out, "--max_shard_size",
           "150KB", "--no_progress", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_to_the_bytes_of_one_run(tiny_hf, tmp_path):
    """A SIGKILL after one data file leaves no .metadata and no tracker; --resume keeps the
    finished file and ends with the bytes of an uninterrupted single-worker run."""
    hf = tiny_hf(LLAMA)
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    to_dist(hf, whole, max_shard_size="150KB")
    proc = _cli(hf, killed, fault="kill_after=1")
    assert proc.returncode == -9, proc.stderr
    assert not Path(killed, "latest_checkpointed_iteration.txt").exists()
    assert not Path(killed, "release", ".metadata").exists()
    proc = _cli(hf, killed, "--resume", "--max_workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "1 finished earlier, verified and kept" in proc.stderr
    assert read_tree(killed, KEEP_OUT) == read_tree(whole, KEEP_OUT)


def test_fp8_source_is_written_dequantized(tiny_hf, tmp_path, capsys):
    """DeepSeek's FP8 layout -> torch_dist holds the nominal-dtype values (megatron-core >= 0.17
    stores FP8 parameters that way); back to HF they equal the dequantized checkpoint."""
    from tiny_models import dequantize_checkpoint, make_fp8_checkpoint

    bf16 = tiny_hf(TinySpec("deepseek_v3", mtp_layers=1, wide=True, dtype=torch.bfloat16))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"))
    dist = str(tmp_path / "dist")
    capsys.readouterr()
    to_dist(fp8, dist)
    assert "block-FP8 tensors are written dequantized to bfloat16" in capsys.readouterr().err
    dtypes = {m.properties.dtype for m in metadata(dist).state_dict_metadata.values() if hasattr(m, "properties")}
    assert torch.float8_e4m3fn not in dtypes
    assert mcore_to_hf(dist, str(tmp_path / "back")) == 0
    assert_same_tensors(load_hf_tensors(dequantize_checkpoint(fp8, str(tmp_path / "deq"))),
                        load_hf_tensors(str(tmp_path / "back")))


def test_two_processes_write_what_one_writes(tiny_hf, tmp_path):
    """--world_size 2: each process writes its share of the .distcp files, rank 0 the metadata
    (from every file's blob index): the bytes of one process."""
    from fixtures import free_port

    hf = tiny_hf(LLAMA)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    to_dist(hf, one, max_shard_size="150KB")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "CONVERT_CHECKPOINT_FAULT")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "convert_checkpoint", "--load_platform", "huggingface", "--save_platform", "mcore",
           "--ckpt-format", "torch_dist", "--load_ckpt_path", hf, "--save_ckpt_path", two, "--max_shard_size",
           "150KB", "--no_progress", "--world_size", "2"]
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:] if p.stderr else ""
    assert read_tree(two, KEEP_OUT) == read_tree(one, KEEP_OUT)
    assert json.load(open(os.path.join(two, "conversion_report.json")))["processes"] == 2


def test_a_te_fp8_chunk_is_read_dequantized(tiny_hf, tmp_path):
    """megatron-core <= 0.16 saves FP8 parameters as they are: a chunk that holds a pickled TE
    block-FP8 tensor (2-D, without the layer axis) is read without TE, in its nominal dtype."""
    from convert_checkpoint.quant import te_pickle

    hf = tiny_hf(QWEN3_MOE_BF16)
    dist = str(tmp_path / "dist")
    to_dist(hf, dist)
    codes = (torch.randn(64, 128) * 4).to(torch.float8_e4m3fn)
    te_pickle.save(te_pickle.blockwise_param(codes, torch.tensor([[0.5]]), torch.bfloat16), str(tmp_path / "blob"))
    blob = (tmp_path / "blob").read_bytes()
    md = metadata(dist)
    key = "decoder.layers.self_attention.linear_proj.weight"
    index = MetadataIndex(key, torch.Size([1, 0, 0]))
    file = Path(dist, "release", md.storage_data[index].relative_path)
    start = file.stat().st_size
    with open(file, "ab") as f:
        f.write(blob)
    md.storage_data[index] = type(md.storage_data[index])(file.name, start, len(blob))
    save_metadata(dist, md)
    assert mcore_to_hf(dist, str(tmp_path / "hf")) == 0
    got, want = load_hf_tensors(str(tmp_path / "hf")), load_hf_tensors(hf)
    assert torch.equal(got["model.layers.1.self_attn.o_proj.weight"], (codes.float() * 0.5).to(torch.bfloat16))
    assert torch.equal(got["model.layers.0.self_attn.o_proj.weight"], want["model.layers.0.self_attn.o_proj.weight"])


def test_a_training_checkpoint_at_an_iteration(tiny_hf, tmp_path):
    """iter_0000010/ named by the tracker, a common.pt with a training run's other entries: the
    model is read, from the root or from the iteration directory itself."""
    hf = tiny_hf(LLAMA)
    root = tmp_path / "run"
    to_dist(hf, str(root))
    (root / "release").rename(root / "iter_0000010")
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    common_path = root / "iter_0000010" / "common.pt"
    common = torch.load(common_path, weights_only=False)
    common.update(iteration=10, num_floating_point_operations_so_far=1.5e15,
                  optimizer={"param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                  opt_param_scheduler={"num_steps": 10, "max_lr": 1e-4})
    torch.save(common, common_path)
    for i, path in enumerate((root, root / "iter_0000010")):
        out = str(tmp_path / f"hf{i}")
        assert mcore_to_hf(str(path), out) == 0
        assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(out))


def test_what_torchs_own_writer_makes_is_read(tiny_hf, tmp_path):
    """torch.distributed.checkpoint.save of full tensors (megatron's model-free
    save_dist_checkpoint_full does this): one chunk of every layer per key, another blob layout."""
    import shutil

    import torch.distributed.checkpoint as tdcp

    hf = tiny_hf(QWEN3_MOE_BF16)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    to_dist(hf, str(ours))
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in metadata(str(ours)).state_dict_metadata.items() if hasattr(m, "size")}
    tdcp.load(state, storage_reader=tdcp.FileSystemReader(str(ours / "release")))
    tdcp.save(state, storage_writer=tdcp.FileSystemWriter(str(theirs / "release")))
    for name in ("common.pt", "metadata.json"):
        shutil.copy(ours / "release" / name, theirs / "release" / name)
    (theirs / "latest_checkpointed_iteration.txt").write_text("release")
    chunks = metadata(str(theirs)).state_dict_metadata["decoder.layers.mlp.experts.experts.linear_fc1.weight"].chunks
    assert len(chunks) == 1 and list(chunks[0].sizes) == [4, 4, 64, 64]
    assert mcore_to_hf(str(theirs), str(tmp_path / "hf")) == 0
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(str(tmp_path / "hf")))
