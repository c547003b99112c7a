"""Converters (issue 7): the protocol, the built-ins, `convert-checkpoint hf` and the
`--converter` pre-stage. Fixtures come from the real compressed-tensors compressors or from
the documented AWQ / ModelOpt layouts (quantized_fixtures.py)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from fixtures import load_hf_tensors
from helpers import assert_same_tensors, bits, hf_to_mcore, mcore_to_hf
from tiny_models import TinySpec, dequantize_checkpoint, make_fp8_checkpoint

import quantized_fixtures as qf
from convert_checkpoint import convert_checkpoint
from convert_checkpoint.cli import main
from convert_checkpoint.errors import ConversionError

LLAMA = TinySpec("llama", dtype=torch.bfloat16, num_layers=2)
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "converters")


def hf(src, dst, *converters, **flags) -> int:
    argv = ["hf", str(src), str(dst)]
    for c in converters:
        argv += ["--converter", c]
    for k, v in flags.items():
        argv += [f"--{k}"] + ([] if v is True else [str(v)])
    return main(argv + ["--no_progress"])


def config_of(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def llama(tiny_hf):
    return tiny_hf(LLAMA)


@pytest.fixture(scope="module")
def ct_w4a16(llama, tmp_path_factory):
    return qf.make_ct_checkpoint(llama, str(tmp_path_factory.mktemp("ct") / "w4a16"), "W4A16", 32)


# --- the library's formats, dequantized --------------------------------------------------

@pytest.mark.parametrize("preset,group", [("W4A16", 32), ("W4A16_ASYM", 32), ("W8A16", 32), ("NVFP4", 16), ("FP8", None)])
def test_ct_dequantizer_equals_the_library_decompressor(llama, tmp_path, preset, group):
    src = qf.make_ct_checkpoint(llama, str(tmp_path / "src"), preset, group)
    # scales of odd layers live in the second shard: cross-shard dependencies
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    assert any(v == qf.SCALE_SHARD for k, v in index.items() if ".layers.1." in k)
    assert hf(src, tmp_path / "out", "ct_dequantizer") == 0
    assert_same_tensors(load_hf_tensors(str(tmp_path / "out")), qf.ct_reference(src))
    assert "quantization_config" not in config_of(tmp_path / "out")


def test_dequantize_picks_the_converter_from_the_config(ct_w4a16, tmp_path):
    assert hf(ct_w4a16, tmp_path / "out", "dequantize:dtype=float32") == 0
    assert_same_tensors(load_hf_tensors(str(tmp_path / "out")), qf.ct_reference(ct_w4a16, torch.float32))


# --- FP8 blocks ----------------------------------------------------------------------------

def test_fp8_block_dequantizer_odd_shapes_and_cross_shard_scales(tiny_hf, tmp_path):
    """DeepSeek-V3 tiny: dimensions that are not multiples of 128 (the library's converter
    returns non-contiguous tensors there), scales in another shard, fp32 (non-pow2) scales."""
    bf16 = tiny_hf(TinySpec("deepseek_v3", dtype=torch.bfloat16, num_layers=2))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"), pow2=False)
    reference = dequantize_checkpoint(fp8, str(tmp_path / "ref"))
    assert hf(fp8, tmp_path / "out", "fp8_block_dequantizer") == 0
    assert_same_tensors(load_hf_tensors(str(tmp_path / "out")), load_hf_tensors(reference))
    assert "quantization_config" not in config_of(tmp_path / "out")
    assert os.path.isfile(tmp_path / "out" / "generation_config.json")


def test_fp8_block_dequantizer_equals_the_library_on_block_multiples(tiny_hf, tmp_path):
    from compressed_tensors.entrypoints.convert import FP8BlockDequantizer as LibraryDequantizer

    bf16 = tiny_hf(TinySpec("deepseek_v3", dtype=torch.bfloat16, num_layers=2, wide=True))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"), pow2=False)
    assert hf(fp8, tmp_path / "out", "fp8_block_dequantizer:dtype=float16") == 0
    expected = LibraryDequantizer.from_pretrained(fp8, dtype=torch.float16).process(load_hf_tensors(fp8))
    assert_same_tensors(load_hf_tensors(str(tmp_path / "out")), expected)


def test_fp8_block_targets_and_ignore(tiny_hf, tmp_path):
    bf16 = tiny_hf(TinySpec("deepseek_v3", dtype=torch.bfloat16, num_layers=2))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"))
    assert hf(fp8, tmp_path / "out", r"fp8_block_dequantizer:ignore=re:.*\.experts\.") == 0
    out, src = load_hf_tensors(str(tmp_path / "out")), load_hf_tensors(fp8)
    expert = "model.layers.1.mlp.experts.0.up_proj.weight"
    assert out[expert].dtype == torch.float8_e4m3fn and torch.equal(bits(out[expert]), bits(src[expert]))
    assert torch.equal(out[expert + "_scale_inv"], src[expert + "_scale_inv"])
    assert out["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" not in out
    assert config_of(tmp_path / "out")["quantization_config"]["quant_method"] == "fp8"  # still needed


# --- AutoAWQ and ModelOpt -------------------------------------------------------------------

def test_autoawq_to_compressed_tensors(llama, tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    src, reference = qf.make_awq_checkpoint(llama, str(tmp_path / "awq"), group=32)
    assert hf(src, tmp_path / "ct", "autoawq") == 0
    ct = load_hf_tensors(str(tmp_path / "ct"))
    awq = load_hf_tensors(src)
    module = "model.layers.1.self_attn.q_proj"
    q, zeros, _ = qf.awq_quantize(load_hf_tensors(llama)[module + ".weight"], 32)
    # unpack, reorder nibbles, signed shift: CT holds q - 8 in [out, in], sequential nibbles
    assert torch.equal(unpack_from_int32(ct[module + ".weight_packed"], 4, torch.Size(q.t().shape)), (q - 8).t().to(torch.int8))
    assert torch.equal(unpack_from_int32(ct[module + ".weight_zero_point"], 4, torch.Size(zeros.t().shape), packed_dim=0),
                       (zeros - 8).t().to(torch.int8))
    assert torch.equal(ct[module + ".weight_scale"], awq[module + ".scales"].t())
    qc = config_of(tmp_path / "ct")["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["config_group_0"]["weights"]["group_size"] == 32  # from the AWQ config
    # CT -> bf16 with the library's decompressor equals AWQ's own formula
    assert hf(tmp_path / "ct", tmp_path / "deq", "ct_dequantizer:dtype=float16") == 0
    assert_same_tensors(load_hf_tensors(str(tmp_path / "deq")), reference)


def test_modelopt_nvfp4_to_compressed_tensors(llama, tmp_path):
    src = qf.make_modelopt_checkpoint(llama, str(tmp_path / "mo"))
    assert hf(src, tmp_path / "ct", "modelopt_nvfp4") == 0
    mo, ct = load_hf_tensors(src), load_hf_tensors(str(tmp_path / "ct"))
    modules = sorted({n.rpartition(".")[0] for n in mo if n.endswith(".weight_scale_2")})
    assert len(modules) == 14
    for m in modules:
        assert torch.equal(ct[f"{m}.weight_packed"], mo[f"{m}.weight"])
        assert torch.equal(bits(ct[f"{m}.weight_scale"]), bits(mo[f"{m}.weight_scale"]))
        assert torch.equal(ct[f"{m}.weight_global_scale"], 1 / mo[f"{m}.weight_scale_2"])
        assert torch.equal(ct[f"{m}.input_global_scale"], 1 / mo[f"{m}.input_scale"])
        assert f"{m}.weight" not in ct and f"{m}.weight_scale_2" not in ct
    qc = config_of(tmp_path / "ct")["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized" and "lm_head" in qc["ignore"]
    # ... and dequantized in one run: exactly the library's decompressor on the CT tensors, and
    # ModelOpt's formula up to the library's bf16 arithmetic (and the 1-ulp global-scale inversion)
    assert hf(src, tmp_path / "bf16", "dequantize:dtype=float32") == 0
    out = load_hf_tensors(str(tmp_path / "bf16"))
    library = {n: t for n, t in qf.ct_reference(str(tmp_path / "ct"), torch.float32).items() if not n.endswith("input_global_scale")}
    assert_same_tensors(out, library)
    for m in modules:
        expected = qf.modelopt_dequantize({k: mo[f"{m}.{k}"] for k in ("weight", "weight_scale", "weight_scale_2")})
        torch.testing.assert_close(out[f"{m}.weight"], expected, rtol=2**-7, atol=0)  # two bf16 roundings


# --- the pre-stage: W4A16 -> MCore (TP=2) -> HF bf16 ----------------------------------------

def test_w4a16_to_mcore_and_back_equals_the_dequantized_source(ct_w4a16, tmp_path):
    assert hf_to_mcore(ct_w4a16, str(tmp_path / "mcore"), tensor_model_parallel_size=2, converter="dequantize") == 0
    assert not os.path.exists(tmp_path / "mcore" / "intermediate")
    assert mcore_to_hf(str(tmp_path / "mcore"), str(tmp_path / "back")) == 0
    assert_same_tensors(load_hf_tensors(str(tmp_path / "back")), qf.ct_reference(ct_w4a16))


def test_quantized_source_without_converter_is_refused(ct_w4a16, tmp_path, capsys):
    assert hf_to_mcore(ct_w4a16, str(tmp_path / "m")) == 2
    assert "add --converter dequantize" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")


def test_converter_chain_must_leave_bf16_or_fp8_for_mcore(llama, tmp_path, capsys):
    src, _ = qf.make_awq_checkpoint(llama, str(tmp_path / "awq"))
    assert hf_to_mcore(src, str(tmp_path / "m"), converter="autoawq") == 2
    assert "compressed-tensors" in capsys.readouterr().err


# --- custom converters, the Python API, protocol spellings -----------------------------------

def test_custom_converter_module_factory_in_the_pre_stage(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    fp32 = tiny_hf(TinySpec("llama", num_layers=2))
    assert hf_to_mcore(fp32, str(tmp_path / "m"), converter="cast_dtype:make:dtype=bfloat16") == 0
    assert mcore_to_hf(str(tmp_path / "m"), str(tmp_path / "back")) == 0
    expected = {n: t.to(torch.bfloat16) for n, t in load_hf_tensors(fp32).items()}
    assert_same_tensors(load_hf_tensors(str(tmp_path / "back")), expected)


def test_python_api_with_objects_and_the_old_create_config_spelling(ct_w4a16, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    from cast_dtype import CastDtype

    class OldStyle:  # compressed-tensors' earlier protocol: create_config(), validate returns None
        def get_dependencies(self, name):
            return set()

        def validate(self, tensors):
            return None

        def process(self, tensors):
            return tensors

        def create_config(self):
            return None

    convert_checkpoint(ct_w4a16, tmp_path / "out", ["dequantize", CastDtype(torch.float32), OldStyle()], max_workers=2,
                       progress=False)
    expected = {n: t.float() for n, t in qf.ct_reference(ct_w4a16).items()}
    assert_same_tensors(load_hf_tensors(str(tmp_path / "out")), expected)
    assert config_of(tmp_path / "out")["torch_dtype"] == "float32"
    assert "quantization_config" not in config_of(tmp_path / "out")
    report = json.load(open(tmp_path / "out" / "conversion_report.json"))
    assert report["direction"] == "hf->hf" and report["options"]["converters"][0] == "dequantize"


def test_library_converter_objects_plug_in(tiny_hf, tmp_path):
    from compressed_tensors.entrypoints.convert import FP8BlockDequantizer as LibraryDequantizer

    bf16 = tiny_hf(TinySpec("deepseek_v3", dtype=torch.bfloat16, num_layers=2, wide=True))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"))
    convert_checkpoint(fp8, tmp_path / "out", LibraryDequantizer.from_pretrained(fp8), progress=False)
    assert_same_tensors(load_hf_tensors(str(tmp_path / "out")), load_hf_tensors(dequantize_checkpoint(fp8, str(tmp_path / "r"))))


def test_other_files_copied_resume_and_dry_run(ct_w4a16, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ct_w4a16, src)
    (src / "tokenizer").mkdir()
    (src / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (src / "README.md").write_text("model card")
    assert hf(src, tmp_path / "dry", "ct_dequantizer", dry_run=True, verbose=True) == 0
    printed = capsys.readouterr().out
    assert "plan: hf->hf  converters: ct_dequantizer" in printed and "weight_packed" not in printed.split("target:")[1]
    assert not os.path.exists(tmp_path / "dry")
    assert hf(src, tmp_path / "out", "ct_dequantizer") == 0
    assert (tmp_path / "out" / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert (tmp_path / "out" / "README.md").read_text() == "model card"
    before = {f: os.stat(tmp_path / "out" / f).st_ino for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")}
    assert hf(src, tmp_path / "out", "ct_dequantizer", resume=True) == 0
    assert {f: os.stat(tmp_path / "out" / f).st_ino for f in before} == before  # verified and kept
    assert hf(src, tmp_path / "out", "ct_dequantizer:dtype=float16", resume=True) == 2  # another plan
    assert "written by a different plan" in _error(capsys)


# --- validation errors: one line naming the tensor, nothing written ---------------------------

def _drop(src: str, name: str) -> None:
    from safetensors.torch import load_file, save_file

    index_path = os.path.join(src, "model.safetensors.index.json")
    index = json.load(open(index_path))
    file = os.path.join(src, index["weight_map"].pop(name))
    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})
    json.dump(index, open(index_path, "w"))


def _replace(src: str, name: str, value: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    file = os.path.join(src, index["weight_map"][name])
    tensors = load_file(file)
    tensors[name] = value
    save_file(tensors, file, metadata={"format": "pt"})


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_scale_is_named_before_writing(ct_w4a16, tmp_path, capsys):
    import shutil

    src = str(tmp_path / "src")
    shutil.copytree(ct_w4a16, src)
    _drop(src, "model.layers.1.mlp.up_proj.weight_scale")
    assert hf(src, tmp_path / "out", "ct_dequantizer") == 2
    assert "model.layers.1.mlp.up_proj.weight_scale" in _error(capsys)
    assert not os.path.exists(tmp_path / "out")


def test_mismatched_scale_shape_is_named(tiny_hf, llama, tmp_path, capsys):
    bf16 = tiny_hf(TinySpec("deepseek_v3", dtype=torch.bfloat16, num_layers=2))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"))
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    _replace(fp8, name, torch.ones(3, 3))
    assert hf(fp8, tmp_path / "out", "fp8_block_dequantizer") == 2
    assert name in _error(capsys)
    src, _ = qf.make_awq_checkpoint(llama, str(tmp_path / "awq"))
    _replace(src, "model.layers.0.mlp.down_proj.scales", torch.ones(1, 64, dtype=torch.float16))
    assert hf(src, tmp_path / "out2", "autoawq") == 2
    assert "model.layers.0.mlp.down_proj.scales" in _error(capsys)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out2")


def test_unknown_format_and_bad_specs(ct_w4a16, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ct_w4a16, src)
    config = config_of(src)
    config["quantization_config"]["format"] = "bogus-quantized"
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "bogus-quantized"
    json.dump(config, open(src / "config.json", "w"))
    assert hf(src, tmp_path / "out", "ct_dequantizer") == 2
    assert "bogus-quantized" in _error(capsys)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(config, open(src / "config.json", "w"))
    assert hf(src, tmp_path / "out", "dequantize") == 2
    assert "'gptq'" in _error(capsys)
    for spec, words in [("nope", "unknown converter"), ("ct_dequantizer:colour=red", "unknown option colour"),
                        ("fp8_block_dequantizer:dtype=int3", "dtype"), ("no_such_module_xyz:make", "cannot import")]:
        assert hf(ct_w4a16, tmp_path / "out", spec) == 2
        assert words in _error(capsys)
    assert not os.path.exists(tmp_path / "out")


def test_a_converter_that_is_not_one_is_refused(ct_w4a16, tmp_path):
    with pytest.raises(ConversionError, match="has no process"):
        convert_checkpoint(ct_w4a16, tmp_path / "out", object(), progress=False)
