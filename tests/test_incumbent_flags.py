"""Every flag of LoongForge's parser is accepted in both spellings: honoured, a no-op that leaves
the output byte-identical, or rejected with one line naming the flag (never "unrecognized")."""
from __future__ import annotations

import hashlib
import os
import pathlib
import re

import pytest

from helpers import convert, hf_to_mcore
from tiny_models import TinySpec

HERE = pathlib.Path(__file__).resolve().parent
FLAG_LIST = HERE / "data" / "incumbent_flags.txt"
REFERENCE = HERE.parent.parent / "shared" / "reference" / "incumbent_cli.md"

# A value each value-taking flag accepts syntactically (the treatment decides what happens next).
VALUES = {"quant_method": "pt", "amax_epsilon": "0", "force_pow_2_scales": "true", "hf_dequantize_dtype": "bfloat16",
          "fp8_quant_transfer_type": "float32", "module": "language", "mtp_num_layers": "0", "hf_checkpoint_device": "cpu",
          "torch_dtype": "float32", "vocab_size": "250", "num_virtual_stages_per_pipeline_rank": "1",
          "tensor_model_parallel_size": "1", "pipeline_model_parallel_size": "1", "data_parallel_size": "8",
          "expert_parallel_size": "1", "expert_tensor_parallel_size": "1", "pad_vocab_size_to": "256",
          "add_embedding_padding": "true", "make_vocab_size_divisible_by": "128", "custom_pipeline_layers": "4",
          "num_layers_per_virtual_pipeline_stage": "4", "transformer_impl": "transformer_engine", "num_experts": "0",
          "checkpoint_format": "safetensors", "max_workers": "1", "cache_path": "/tmp/unused"}
REQUIRED = ("load_platform", "save_platform", "load_ckpt_path", "save_ckpt_path")


def incumbent_flags() -> list[list[str]]:
    """Each of the incumbent's flags with its aliases, from the checked-in list."""
    return [line.split() for line in FLAG_LIST.read_text().splitlines() if line.startswith("--")]


def test_flag_list_is_the_incumbents_parser():
    """The checked-in list is section 1 of the reference (when the reference tree is present)."""
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is not present here; the checked-in list is used as it is")
    section = REFERENCE.read_text().split("## 1.")[1].split("## 2.")[0]
    parsed = [re.findall(r"--[\w-]+", line.split("|")[1]) for line in section.splitlines() if line.startswith("| `--")]
    assert parsed == incumbent_flags() and len(parsed) == 70


def test_every_flag_has_a_treatment():
    from convert_checkpoint import compat

    known = {n.replace("-", "_") for f in compat.FLAGS for n in (f.name, *f.aliases)}
    for names in incumbent_flags():
        assert any(n[2:].replace("-", "_") in known for n in names), names
    assert {f.treatment for f in compat.FLAGS} == {compat.HONOURED, compat.NO_OP, compat.REJECTED}


def _spellings(flag: str) -> list[str]:
    return sorted({"--" + flag[2:].replace("-", "_"), "--" + flag[2:].replace("_", "-")})


def _argv(src, out, flag: str) -> list[str]:
    argv = ["--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", src,
            "--save_ckpt_path", out, "--dry_run"]
    dest = flag[2:].replace("-", "_")
    if dest in REQUIRED:
        return argv  # given above
    from convert_checkpoint import compat

    spec = next((f for f in compat.FLAGS if dest in {n.replace("-", "_") for n in (f.name, *f.aliases)}), None)
    takes_value = spec.takes_value if spec is not None else True
    return argv + ([flag, VALUES.get(dest, "x")] if takes_value else [flag])


@pytest.mark.parametrize("names", incumbent_flags(), ids=lambda n: n[0])
def test_no_flag_is_unrecognized(names, tiny_hf, tmp_path, capsys, monkeypatch):
    src = tiny_hf(TinySpec("llama"))
    arch_yaml = tmp_path / "arch.yaml"
    arch_yaml.write_text("num_layers: 4\n")
    monkeypatch.setitem(VALUES, "config_file", str(arch_yaml))
    monkeypatch.setitem(VALUES, "convert_file", str(HERE.parent / "configs/models/llama/ckpt_convert/llama_convert.yaml"))
    capsys.readouterr()
    for name in names:
        for spelling in _spellings(name):
            rc = convert(*_argv(src, str(tmp_path / "out"), spelling))
            err = capsys.readouterr().err
            assert "unrecognized arguments" not in err and "invalid choice" not in err, (spelling, err)
            if rc != 0:
                lines = err.strip().splitlines()
                assert rc == 2 and len(lines) == 1, (spelling, err)
                # the flag is named, in either spelling
                assert "__" + name[2:].replace("-", "_") in lines[0].replace("-", "_"), (spelling, lines)


def _rejected():
    from convert_checkpoint import compat

    return [f for f in compat.FLAGS if f.treatment == compat.REJECTED]


def test_rejected_flags_name_the_flag_and_write_nothing(tiny_hf, tmp_path, capsys):
    src = tiny_hf(TinySpec("llama"))
    out = str(tmp_path / "out")
    capsys.readouterr()
    for flag in _rejected():
        argv = ["--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", src,
                "--save_ckpt_path", out, f"--{flag.name}"] + (["some_value"] if flag.takes_value else [])
        assert convert(*argv) == 2, flag.name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"convert-checkpoint: error: --{flag.name}"), lines
        assert flag.note in lines[0]
        assert not os.path.exists(out)
    # The default value of a rejected flag is harmless.
    assert convert("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", src,
                   "--save_ckpt_path", out, "--module", "language", "--checkpoint-format", "safetensors",
                   "--dry_run") == 0


def _hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name != "conversion_report.json":  # timings and the flags as given
                path = os.path.join(dirpath, name)
                out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_no_op_flags_leave_the_output_byte_identical(tiny_hf, tmp_path):
    from convert_checkpoint import compat

    src = tiny_hf(TinySpec("llama"))
    plain, with_flags = str(tmp_path / "plain"), str(tmp_path / "flags")
    assert hf_to_mcore(src, plain, tensor_model_parallel_size=2) == 0
    extra: list[str] = []
    for flag in compat.FLAGS:
        if flag.treatment == compat.NO_OP:
            extra += [f"--{flag.name}"] + ([VALUES.get(flag.dest, "x")] if flag.takes_value else [])
    assert len(extra) >= 12
    assert convert("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", src,
                   "--save_ckpt_path", with_flags, "--tensor_model_parallel_size", "2", *extra) == 0
    assert _hashes(plain) == _hashes(with_flags)  # manifest (and its resume fingerprint) included


def test_honoured_incumbent_flags(tiny_hf, tmp_path, capsys):
    src = tiny_hf(TinySpec("llama"))
    base = ["--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", src]
    out = str(tmp_path / "m")
    # --no-te (and its other name) writes local names, like --transformer_impl local.
    assert convert(*base, "--save_ckpt_path", out, "--input-layernorm-not-in-attn") == 0
    import torch

    sd = torch.load(os.path.join(out, "release", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    assert sd["args"].transformer_impl == "local"
    assert "decoder.layers.0.input_layernorm.weight" in sd["model"]
    # --resume-convert resumes like --resume (the run is finished: every file is verified and kept).
    capsys.readouterr()
    assert convert(*base, "--save_ckpt_path", out, "--no-te", "--resume-convert") == 0
    assert "finished earlier, verified and kept" in capsys.readouterr().err
    # The checking flags must agree with the model.
    for flag, value, fragment in (("--num_experts", "8", "has 0 routed experts"),
                                  ("--vocab_size", "32000", "vocabulary of 250"),
                                  ("--torch_dtype", "bfloat16", "the checkpoint holds float32")):
        assert convert(*base, "--save_ckpt_path", str(tmp_path / "x"), flag, value) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and fragment in err[0], err
    assert convert(*base, "--save_ckpt_path", str(tmp_path / "x"), "--num_experts", "0", "--vocab_size", "250",
                   "--torch_dtype", "float32", "--dry_run") == 0
    assert convert(*base, "--save_ckpt_path", str(tmp_path / "x"), "--no-te", "--transformer_impl",
                   "transformer_engine") == 2
    assert "--no-te contradicts" in capsys.readouterr().err


def test_hf_dequantize_int4_is_the_dequantize_converter(tiny_hf, tmp_path):
    """LoongForge's INT4 switch (compressed-tensors pack-quantized checkpoints) runs our
    dequantize pre-stage, to the dtype --hf-dequantize-dtype names: the same bytes as
    --converter dequantize:dtype=...,if_quantized=true (a full-precision checkpoint passes unchanged)."""
    from quantized_fixtures import make_ct_checkpoint

    ct = make_ct_checkpoint(tiny_hf(TinySpec("llama", dtype=__import__("torch").bfloat16)), str(tmp_path / "ct"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert hf_to_mcore(ct, a, converter="dequantize:dtype=float32,if_quantized=true") == 0
    assert convert("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", ct,
                   "--save_ckpt_path", b, "--hf_dequantize_int4", "--hf-dequantize-dtype", "float32") == 0
    assert _hashes(a) == _hashes(b)
    assert convert("--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", ct,
                   "--save_ckpt_path", str(tmp_path / "c"), "--hf_dequantize_int4", "--hf-dequantize-dtype", "int4") == 2
