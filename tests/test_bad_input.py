"""Bad input: one clear error line naming the problem, exit code 2, nothing written."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import assert_fails as _assert_fails
from helpers import hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec


@pytest.fixture
def hf_copy(tiny_hf, tmp_path):
    path = str(tmp_path / "hf")
    shutil.copytree(tiny_hf(TinySpec("llama")), path)
    return path


def _edit_tensors(hf_dir, edit):
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def test_missing_tensor(hf_copy, tmp_path, capsys):
    _edit_tensors(hf_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out), out, "missing tensor model.layers.1.mlp.up_proj.weight")


def test_unmapped_tensor(hf_copy, tmp_path, capsys):
    _edit_tensors(hf_copy, lambda t: t.__setitem__("model.layers.0.self_attn.extra_proj.weight", torch.zeros(2, 2)))
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out), out, "unmapped tensor model.layers.0.self_attn.extra_proj.weight")


def test_shape_mismatch_with_config(hf_copy, tmp_path, capsys):
    _edit_config(hf_copy, intermediate_size=96)
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out), out, "model.layers.0.mlp.gate_proj.weight has shape [128, 64]",
                  "config implies [96, 64]")


@pytest.mark.parametrize("tp,what", [(3, "num_attention_heads 8"), (8, "num_query_groups 4")])
def test_tp_does_not_divide(hf_copy, tmp_path, capsys, tp, what):
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out, tensor_model_parallel_size=tp), out,
                  f"--tensor_model_parallel_size {tp} does not divide {what}")


def test_tp_does_not_divide_ffn(hf_copy, tmp_path, capsys):
    def shrink(t):
        for i in range(4):
            for name in ("gate_proj", "up_proj"):
                t[f"model.layers.{i}.mlp.{name}.weight"] = t[f"model.layers.{i}.mlp.{name}.weight"][:126].clone()
            t[f"model.layers.{i}.mlp.down_proj.weight"] = t[f"model.layers.{i}.mlp.down_proj.weight"][:, :126].clone()
    _edit_tensors(hf_copy, shrink)
    _edit_config(hf_copy, intermediate_size=126)
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out, tensor_model_parallel_size=4), out,
                  "--tensor_model_parallel_size 4 does not divide ffn_hidden_size 126")


@pytest.mark.parametrize("layers,fragment", [
    ("1,1,2", "has 3 entries, expected one per virtual stage"),
    ("1,2", "sums to 3, but the model has 4 layers"),
    ("4,0", "leaves a virtual stage without layers"),
    ("2,x", "expected comma-separated integers"),
])
def test_bad_custom_pipeline_layers(hf_copy, tmp_path, capsys, layers, fragment):
    out = str(tmp_path / "out")
    rc = hf_to_mcore(hf_copy, out, pipeline_model_parallel_size=2, custom_pipeline_layers=layers)
    _assert_fails(capsys, rc, out, "--custom_pipeline_layers" if "leaves" not in fragment else "pipeline layout", fragment)


def test_unknown_family(hf_copy, tmp_path, capsys):
    _edit_config(hf_copy, model_type="mystery_lm", architectures=["MysteryForCausalLM"])
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out), out, "unknown model family", "'mystery_lm'")


def test_output_not_empty_without_overwrite(hf_copy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = hf_to_mcore(hf_copy, str(out))
    err = capsys.readouterr().err
    assert rc == 2 and "is not empty; pass --overwrite" in err
    assert os.listdir(out) == ["keep.txt"]
    # With --overwrite the directory is replaced by a complete checkpoint.
    assert hf_to_mcore(hf_copy, str(out), overwrite=True) == 0
    assert sorted(os.listdir(out)) == ["conversion_manifest.json", "conversion_report.json",
                                       "latest_checkpointed_iteration.txt", "release"]


def test_corrupt_safetensors_header(hf_copy, tmp_path, capsys):
    path = os.path.join(hf_copy, "model.safetensors")
    with open(path, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out), out, "corrupt or truncated safetensors file", "model.safetensors")


def test_truncated_safetensors(hf_copy, tmp_path, capsys):
    path = os.path.join(hf_copy, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out), out, "truncated safetensors file", "model.safetensors")


def test_garbage_safetensors_header(hf_copy, tmp_path, capsys):
    path = os.path.join(hf_copy, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json")
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out), out, "corrupt safetensors file", "unreadable header")


def test_unsupported_flag_is_rejected(hf_copy, tmp_path, capsys):
    out = str(tmp_path / "out")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out, torch_dtype="float16"), out, "--torch_dtype", "not supported yet")
    # FP8 output for a family whose YAML marks no tensor dtype: fp8 would be a silent no-op.
    _assert_fails(capsys, hf_to_mcore(hf_copy, out, convert_to_fp8=True), out, "--convert_to_fp8", "dtype: fp8")
    # MTP layers on a family that has none: named, not ignored.
    _assert_fails(capsys, hf_to_mcore(hf_copy, out, mtp_num_layers=1), out, "family llama has no multi-token-prediction")
    assert hf_to_mcore(hf_copy, out, mtp_num_layers=0, dry_run=True) == 0  # the harmless value passes


def test_output_inside_source_is_rejected(hf_copy, capsys):
    out = os.path.join(hf_copy, "mcore")
    _assert_fails(capsys, hf_to_mcore(hf_copy, out), out, "overlaps --load_ckpt_path")


@pytest.fixture
def mcore_copy(tiny_hf, tmp_path):
    path = str(tmp_path / "mcore")
    assert hf_to_mcore(tiny_hf(TinySpec("llama")), path, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 0
    return path


def test_mcore_missing_rank_file(mcore_copy, tmp_path, capsys):
    shutil.rmtree(os.path.join(mcore_copy, "release", "mp_rank_01_001"))
    out = str(tmp_path / "hf")
    _assert_fails(capsys, mcore_to_hf(mcore_copy, out), out, "missing mp_rank_01_001/model_optim_rng.pt")


def test_mcore_layout_flag_disagrees(mcore_copy, tmp_path, capsys):
    out = str(tmp_path / "hf")
    _assert_fails(capsys, mcore_to_hf(mcore_copy, out, tensor_model_parallel_size=4), out,
                  "--tensor_model_parallel_size 4 disagrees with the checkpoint, whose rank files hold 2")


def test_mcore_unmapped_and_missing_tensor(mcore_copy, tmp_path, capsys):
    path = os.path.join(mcore_copy, "release", "mp_rank_00_000", "model_optim_rng.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["decoder.layers.0.self_attention.rogue.weight"] = torch.zeros(1)
    torch.save(ckpt, path)
    out = str(tmp_path / "hf")
    _assert_fails(capsys, mcore_to_hf(mcore_copy, out), out, "unmapped tensor model/decoder.layers.0.self_attention.rogue.weight")
    del ckpt["model"]["decoder.layers.0.self_attention.rogue.weight"]
    del ckpt["model"]["decoder.layers.1.mlp.linear_fc2.weight"]
    torch.save(ckpt, path)
    _assert_fails(capsys, mcore_to_hf(mcore_copy, out), out, "missing tensor model/decoder.layers.1.mlp.linear_fc2.weight")


def test_mcore_corrupt_rank_file(mcore_copy, tmp_path, capsys):
    path = os.path.join(mcore_copy, "release", "mp_rank_01_000", "model_optim_rng.pt")
    os.truncate(path, os.path.getsize(path) // 2)
    out = str(tmp_path / "hf")
    _assert_fails(capsys, mcore_to_hf(mcore_copy, out), out, "cannot read Megatron checkpoint file", "mp_rank_01_000")


def test_mcore_reference_config_of_another_model(mcore_copy, tiny_hf, tmp_path, capsys):
    other = tiny_hf(TinySpec("llama", num_layers=6))
    capsys.readouterr()  # drop transformers' own progress output
    out = str(tmp_path / "hf")
    _assert_fails(capsys, mcore_to_hf(mcore_copy, out, hf_config_path=other), out,
                  "--hf_config_path", "num_layers 6, the checkpoint has 4")


def test_overwrite_keeps_old_output_when_validation_fails(hf_copy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    rc = hf_to_mcore(hf_copy, str(out), tensor_model_parallel_size=3, overwrite=True)
    assert rc == 2 and "does not divide" in capsys.readouterr().err
    assert os.listdir(out) == ["old.txt"]  # validation runs before anything is removed


def test_nan_and_inf_in_weights_warn_or_stop(tiny_hf, tmp_path, capsys):
    """NaN/Inf values are carried over with a warning naming the tensors; --strict_values stops."""
    src = str(shutil.copytree(tiny_hf(TinySpec("llama")), tmp_path / "nan"))
    file = os.path.join(src, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.1.mlp.down_proj.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(tensors, file, metadata={"format": "pt"})
    out = str(tmp_path / "out")
    assert hf_to_mcore(src, out, tensor_model_parallel_size=2) == 0
    err = capsys.readouterr().err
    assert "warning: 1 tensors hold NaN/Inf values" in err
    assert "decoder.layers.1.mlp.linear_fc2.weight in mp_rank_00/model_optim_rng.pt: 3" in err
    report = json.load(open(os.path.join(out, "conversion_report.json")))
    assert report["nonfinite"] == [{"file": "mp_rank_00/model_optim_rng.pt", "tensor": "decoder.layers.1.mlp.linear_fc2.weight",
                                    "count": 3}]
    strict = str(tmp_path / "strict")
    assert hf_to_mcore(src, strict, tensor_model_parallel_size=2, strict_values=True) == 2
    err = capsys.readouterr().err
    assert "--strict_values" in err and "decoder.layers.1.mlp.linear_fc2.weight" in err
    assert not os.path.exists(os.path.join(strict, "latest_checkpointed_iteration.txt"))


def _two_shards(src: str, dst) -> str:
    """A copy of a one-file checkpoint split into two shards with an index."""
    dst.mkdir()
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, group in shards.items():
        save_file({n: tensors[n] for n in group}, str(dst / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, group in shards.items() for n in group}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
    return str(dst)


def test_index_naming_a_missing_file_and_duplicate_names(hf_copy, tmp_path, capsys):
    sharded = _two_shards(hf_copy, tmp_path / "sharded")
    os.remove(os.path.join(sharded, "model-00002-of-00002.safetensors"))
    _assert_fails(capsys, hf_to_mcore(sharded, str(tmp_path / "o1")), str(tmp_path / "o1"),
                  "names model-00002-of-00002.safetensors, which is missing")
    twice = _two_shards(hf_copy, tmp_path / "twice")
    first = load_file(os.path.join(twice, "model-00001-of-00002.safetensors"))
    second = load_file(os.path.join(twice, "model-00002-of-00002.safetensors"))
    name = sorted(first)[0]
    second[name] = first[name]  # the same tensor name in both shards
    save_file(second, os.path.join(twice, "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    _assert_fails(capsys, hf_to_mcore(twice, str(tmp_path / "o2")), str(tmp_path / "o2"),
                  f"tensor {name} appears in both")
