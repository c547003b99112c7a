"""``convert-checkpoint kt`` and ``verify-kt``: the KTransformers CPU-expert target end to end.

Byte equality with kt-kernel itself is compat/kt_check.py (its own venv); here: every tiny MoE
family within the format's bounds through verify-kt, sources that must give the same experts
(FP8 blocks, compressed-tensors W4A16, Megatron-Core), the output layout, resume after a kill,
every validation error, and --dry_run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from convert_checkpoint.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
    return out


def kt(*args: str) -> int:
    return main(["kt", *args, "--no_progress"])


def verify_kt(*args: str) -> int:
    return main(["verify-kt", *args])


def synthetic(path: str, hidden: int = 128, inter: int = 256, experts: int = 4, layers: int = 2,
              drop: tuple[str, ...] = (), rename=None, config_drop: tuple[str, ...] = (), seed: int = 0) -> str:
    """A DeepSeek-named checkpoint written directly (fast): embeddings, attention, router, experts."""
    g = torch.Generator().manual_seed(seed)
    w = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    t = {"model.embed_tokens.weight": w(64, hidden), "model.norm.weight": w(hidden), "lm_head.weight": w(64, hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        t[f"{p}.self_attn.o_proj.weight"] = w(hidden, hidden)
        t[f"{p}.mlp.gate.weight"] = w(experts, hidden)
        for e in range(experts):
            for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
                t[f"{p}.mlp.experts.{e}.{proj}.weight"] = w(*shape)
    t = {(rename(k) if rename else k): v for k, v in t.items() if k not in drop}
    os.makedirs(path, exist_ok=True)
    save_file(t, os.path.join(path, "model.safetensors"))
    config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": hidden,
              "moe_intermediate_size": inter, "n_routed_experts": experts, "num_experts_per_tok": 2,
              "num_hidden_layers": layers}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if k not in config_drop}, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("{}")
    return path


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    return synthetic(str(tmp_path_factory.mktemp("kt") / "syn"))


# --- output layout ------------------------------------------------------------------------------

def test_merged_layout_names_shards_index_and_copies(syn, tmp_path):
    out = str(tmp_path / "out")
    assert kt("-i", syn, "-o", out, "--quant-method", "int8", "--threadpool-count", "2") == 0
    names = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]
    with safe_open(os.path.join(out, names[0]), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() is None  # save_file without metadata, as kt-kernel
        w = f.get_tensor("blk.0.ffn_down_exps.3.numa.1.weight")
        s = f.get_tensor("blk.0.ffn_down_exps.3.numa.1.scale")
    assert len(keys) == 4 * 3 * 2 * 2 and all(k.startswith("blk.0.ffn_") for k in keys)
    assert w.dtype == torch.int8 and w.shape == (128 * 128,)  # down part: n = hidden, k = I/2
    assert s.dtype == torch.float32 and s.shape == (128,)
    rest = load(out)
    assert "embed_tokens.weight" in rest and "blk.1.self_attn.o_proj.weight" in rest and "lm_head.weight" in rest
    assert "norm.weight" in rest and not any(".mlp.experts." in k for k in rest)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert index["metadata"] == {"total_size": 0} and len(index["weight_map"]) == len(rest)
    assert sorted(os.listdir(out)) == sorted(names + ["model.safetensors.index.json", "config.json", "tokenizer.json",
                                                      "conversion_manifest.json", "conversion_report.json"])
    assert verify_kt(out, "--source", syn) == 0


def test_no_merge_writes_raw_kt_files_only(syn, tmp_path, capsys):
    out = str(tmp_path / "raw")
    assert kt("-i", syn, "-o", out, "--threadpool-count", "2", "--no-merge-safetensor") == 0
    part = os.path.join(out, "_layer_1", "_numa_1")
    files = sorted(os.listdir(part))
    assert len(files) == 4 * 3 * 2
    assert "INT4_gate_0_8192Byte_quant_.kt" in files and "INT4_gate_0_512Byte_scale_.kt" in files  # 128x128/2, 128x4
    assert "INT4_down_3_512Byte_scale_.kt" in files  # down: one scale per hidden row
    assert not [f for f in os.listdir(out) if f.endswith((".safetensors", ".json")) and not f.startswith("conversion_")]
    capsys.readouterr()
    assert verify_kt(out, "--source", syn) == 0
    assert "--kt-threadpool-count 2" in capsys.readouterr().out


def test_dry_run_writes_nothing(syn, tmp_path, capsys):
    out = str(tmp_path / "dry")
    assert kt("-i", syn, "-o", out, "--dry_run") == 0
    assert not os.path.exists(out)
    assert "NUMA parts" in capsys.readouterr().out


def test_memory_per_worker_is_one_part_not_one_layer(syn, tmp_path):
    from convert_checkpoint.kt_cmd import parse_kt_options
    from convert_checkpoint.pipeline import build_plan

    opts = parse_kt_options(["-i", syn, "-o", str(tmp_path / "m"), "--threadpool-count", "2", "--dry_run"])
    plan = build_plan(opts.plan_request(), opts)
    layer = plan.files[0]
    part_bytes = 128 * 128 * 2  # one bf16 part: I/2 x hidden
    layer_bytes = 4 * 3 * 256 * 128 * 2  # the layer's bf16 experts (only 4 here; 256 in DeepSeek-V3)
    assert part_bytes <= plan.memory_bytes(layer) <= 8 * part_bytes
    assert plan.memory_bytes(layer) < layer_bytes / 2


# --- validation: one line, exit 2, nothing written ------------------------------------------------

def _fails(capsys, rc: int, out: str, *fragments: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("convert-checkpoint kt: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not os.path.exists(out) or os.listdir(out) == []


@pytest.mark.parametrize("make,flags,fragments", [
    (dict(), ["--threadpool-count", "3"], ["--threadpool-count 3", "256 is not divisible"]),
    (dict(), ["--threadpool-count", "4"], ["each part holds 64", "multiple of 128"]),
    (dict(inter=192), ["--threadpool-count", "1", "--quant-method", "int8"], []),  # valid: 192 % 64 == 0
    (dict(hidden=96), ["--quant-method", "int8"], ["hidden_size 96", "multiple of 64"]),
    (dict(hidden=192), ["--quant-method", "int4"], ["hidden_size 192", "multiple of 128"]),
    (dict(drop=("model.layers.1.mlp.experts.2.up_proj.weight",)), [], ["layer 1: expert 2 has no up projection"]),
    (dict(drop=tuple(f"model.layers.0.mlp.experts.3.{p}_proj.weight" for p in ("gate", "up", "down"))), [],
     ["layer 0: expert 3 has no gate projection"]),
    (dict(config_drop=("hidden_size",)), [], ["config.json lacks hidden_size"]),
    (dict(config_drop=("n_routed_experts",)), [], ["lacks n_routed_experts|num_experts|num_local_experts"]),
    (dict(rename=lambda k: _shift_experts(k)), [], ["numbered from 1, not 0"]),
    (dict(), ["--quant-method", "moe_int4"], ["--quant-method moe_int4", "another layout"]),
    (dict(), ["--resume-layer", "3"], ["--resume-layer 3", "--resume"]),
    (dict(), ["--save-backward-weights"], ["--save-backward-weights", "not written yet"]),
    (dict(), ["--input-type", "fp8"], ["--input-type fp8", "experts are bf16"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make, flags, fragments):
    src = synthetic(str(tmp_path / "src"), **make)
    out = str(tmp_path / "out")
    rc = kt("-i", src, "-o", out, *flags)
    if not fragments:
        assert rc == 0
        return
    _fails(capsys, rc, out, *fragments)


def _shift_experts(name: str) -> str:
    import re

    return re.sub(r"\.experts\.(\d+)\.", lambda m: f".experts.{int(m.group(1)) + 1}.", name)


def test_unknown_tensor_in_an_expert_module_is_an_error(tmp_path, capsys):
    src = synthetic(str(tmp_path / "src"))
    tensors = load(src)
    tensors["model.layers.0.mlp.experts.0.gate_proj.bias"] = torch.zeros(256, dtype=torch.bfloat16)
    save_file(tensors, os.path.join(src, "model.safetensors"))
    out = str(tmp_path / "out")
    _fails(capsys, kt("-i", src, "-o", out), out, "model.layers.0.mlp.experts.0.gate_proj.bias")


# --- verify-kt catches what kt-kernel's loader would not ------------------------------------------

def test_verify_kt_finds_corruption_and_part_mismatch(syn, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert kt("-i", syn, "-o", out, "--quant-method", "int8", "--threadpool-count", "2") == 0
    shard = os.path.join(out, "model-00002-of-00003.safetensors")
    tensors = load(out)
    layer1 = {k: v for k, v in tensors.items() if k.startswith("blk.1.ffn_")}
    layer1["blk.1.ffn_up_exps.2.numa.1.weight"] = layer1["blk.1.ffn_up_exps.2.numa.1.weight"].clone()
    layer1["blk.1.ffn_up_exps.2.numa.1.weight"][5] += 9
    save_file(layer1, shard)
    capsys.readouterr()
    assert verify_kt(out, "--source", syn) == 1
    text = capsys.readouterr().out
    assert "layer 1 expert 2 up: 1 of" in text and "MISMATCH" in text
    del layer1["blk.1.ffn_down_exps.1.numa.1.scale"]
    save_file(layer1, shard)
    assert verify_kt(out, "--source", syn) == 1
    assert "blk.1.ffn_down_exps.1.numa.1.scale: missing" in capsys.readouterr().out
    other = synthetic(str(tmp_path / "other"), seed=5)  # same shapes, other values
    assert verify_kt(out, "--source", other) == 1


# --- every tiny MoE family, within the bounds ---------------------------------------------------

def _wide_family(family: str, path: str) -> str:
    """A tiny model of ``family`` with hidden 128 and expert size 256 (INT4 at 2 parts)."""
    from tiny_models import TinySpec, make_config
    from transformers import AutoModelForCausalLM

    spec = TinySpec(family, num_layers=2, dtype=torch.bfloat16, mtp_layers=1 if family == "deepseek_v3" else 0)
    config = make_config(spec)
    config.hidden_size = 128
    if family in ("mixtral", "minimax_m2"):
        config.intermediate_size = 256
    else:
        config.moe_intermediate_size = 256
    if family.startswith("qwen3") or family in ("glm4_moe", "minimax_m2"):
        config.head_dim = 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path)
    if spec.mtp_layers:
        from tiny_models import add_mtp_layers

        add_mtp_layers(path, spec.num_layers, spec.mtp_layers)
    return path


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "deepseek_v2", "glm4_moe",
                                    "minimax_m2", "deepseek_v32"])
def test_every_moe_family_within_bounds(family, tmp_path, capsys):
    src = _wide_family(family, str(tmp_path / family))
    for method in ("int4", "int8"):
        out = str(tmp_path / f"out_{method}")
        assert kt("-i", src, "-o", out, "--quant-method", method, "--threadpool-count", "2") == 0
        capsys.readouterr()
        assert verify_kt(out, "--source", src) == 0, capsys.readouterr().out
        text = capsys.readouterr().out
        assert "projections decoded" in text and "--kt-threadpool-count 2" in text
    tensors = load(out)
    moe_layers = {int(k.split(".")[1]) for k in tensors if ".ffn_up_exps." in k}
    dense_first = family.startswith("deepseek") or family == "glm4_moe"
    assert moe_layers == ({1} if dense_first else {0, 1})  # DeepSeek, GLM: layer 0 dense
    if family == "deepseek_v3":  # the MTP layer (2) keeps its other tensors, loses its experts
        assert "blk.2.eh_proj.weight" in tensors and not any(k.startswith("blk.2.ffn_") for k in tensors)
    if family in ("mixtral", "minimax_m2"):  # block_sparse_moe.experts.N.w1/w2/w3
        assert "blk.0.block_sparse_moe.gate.weight" in tensors


# --- sources that must give the same experts ----------------------------------------------------

def _experts(path: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load(path).items() if "_exps." in k}


def test_fp8_source_equals_its_bf16_dequantization(tmp_path, tiny_hf):
    from tiny_models import dequantize_checkpoint, make_fp8_checkpoint

    bf16 = _wide_family("deepseek_v3", str(tmp_path / "bf16"))
    fp8 = make_fp8_checkpoint(bf16, str(tmp_path / "fp8"))  # power-of-two scales: dequantization is exact
    deq = dequantize_checkpoint(fp8, str(tmp_path / "deq"))
    assert kt("-i", fp8, "-o", str(tmp_path / "a"), "--input-type", "fp8", "--quant-method", "int8") == 0
    assert kt("-i", deq, "-o", str(tmp_path / "b"), "--input-type", "bf16", "--quant-method", "int8") == 0
    a, b = load(str(tmp_path / "a")), _experts(str(tmp_path / "b"))
    assert b and all(torch.equal(a[k], v) for k, v in b.items())
    assert a["blk.1.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn  # non-experts copied as stored
    assert "blk.1.self_attn.kv_b_proj.weight_scale_inv" in a
    # The same FP8 model as Megatron-Core FP8 parameters: the same experts and the same FP8 copies.
    mcore = str(tmp_path / "mcore")
    assert main(["--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", fp8,
                 "--save_ckpt_path", mcore, "--no_progress"]) == 0
    assert kt("--load_platform", "mcore", "-i", mcore, "-o", str(tmp_path / "c"), "--quant-method", "int8") == 0
    c = load(str(tmp_path / "c"))
    assert c.keys() == a.keys()
    assert all(c[k].dtype == a[k].dtype and torch.equal(c[k].view(torch.uint8), a[k].view(torch.uint8)) for k in a)


def test_w4a16_source_equals_its_bf16_decompression(tmp_path):
    """Kimi-K2-shaped: W4A16 (group 32) routed experts, everything else bf16; dequantized on the
    way (the dequantize pre-stage is added by itself for a compressed-tensors source)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from quantized_fixtures import ct_compress, ct_scheme, write_two_shards

    bf16 = synthetic(str(tmp_path / "bf16"))
    scheme = ct_scheme("W4A16", 32)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    main_, scales, decompressed = {}, {}, {}
    for name, value in load(bf16).items():
        if ".mlp.experts." not in name:
            main_[name] = decompressed[name] = value
            continue
        module = name.rpartition(".")[0]
        packed = ct_compress(value, scheme)
        for key, t in packed.items():
            (scales if key == "weight_scale" else main_)[f"{module}.{key}"] = t.contiguous()
        decompressed[name] = compressor.decompress(dict(packed), scheme)["weight"].to(torch.bfloat16)
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$"],
                            format=scheme.format, quantization_status=QuantizationStatus.COMPRESSED)
    qc_dict = json.loads(json.dumps(qc.model_dump(), default=lambda v: getattr(v, "value", str(v))))
    w4 = write_two_shards(bf16, str(tmp_path / "w4"), main_, scales, qc_dict)
    ref = str(tmp_path / "ref")
    os.makedirs(ref)
    save_file(decompressed, os.path.join(ref, "model.safetensors"))
    with open(os.path.join(bf16, "config.json")) as f, open(os.path.join(ref, "config.json"), "w") as g:
        g.write(f.read())
    assert kt("-i", w4, "-o", str(tmp_path / "a")) == 0
    assert kt("-i", ref, "-o", str(tmp_path / "b")) == 0
    a, b = _experts(str(tmp_path / "a")), _experts(str(tmp_path / "b"))
    assert len(a) == 2 * 4 * 3 * 2 * 2 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert verify_kt(str(tmp_path / "a"), "--source", w4) == 0


def test_megatron_source_equals_the_hf_source(tmp_path):
    src = _wide_family("qwen3_moe", str(tmp_path / "hf"))
    mcore = str(tmp_path / "mcore")
    assert main(["--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", src,
                 "--save_ckpt_path", mcore, "--tensor_model_parallel_size", "2", "--expert_parallel_size", "2",
                 "--no_progress"]) == 0
    assert kt("-i", src, "-o", str(tmp_path / "a"), "--quant-method", "int8") == 0
    assert kt("--load_platform", "mcore", "--load_ckpt_path", mcore, "-o", str(tmp_path / "b"), "--quant-method", "int8") == 0
    a, b = load(str(tmp_path / "a")), load(str(tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # experts and copies alike
    assert verify_kt(str(tmp_path / "b"), "--load_platform", "mcore", "--source", mcore) == 0
    # a torch_dist checkpoint (detected under --load_platform mcore) gives the same experts too
    dist = str(tmp_path / "dist")
    assert main(["--load_platform", "huggingface", "--save_platform", "mcore", "--ckpt_format", "torch_dist",
                 "--load_ckpt_path", src, "--save_ckpt_path", dist, "--no_progress"]) == 0
    assert kt("--load_platform", "mcore", "--load_ckpt_path", dist, "-o", str(tmp_path / "c"), "--quant-method", "int8") == 0
    c = load(str(tmp_path / "c"))
    experts = [k for k in a if "_exps." in k]
    assert experts and a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


# --- resume ---------------------------------------------------------------------------------------

def _cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tools"))
    env.pop("CONVERT_CHECKPOINT_FAULT", None)
    if fault:
        env["CONVERT_CHECKPOINT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "convert_checkpoint", "kt", *args, "--no_progress"], env=env,
                          capture_output=True, text=True)


def test_resume_after_a_kill_is_byte_identical(syn, tmp_path):
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    assert kt("-i", syn, "-o", clean, "--threadpool-count", "2") == 0
    first = _cli("-i", syn, "-o", killed, "--threadpool-count", "2", fault="kill_after=1")
    assert first.returncode == -9
    assert not os.path.exists(os.path.join(killed, "model.safetensors.index.json"))
    second = _cli("-i", syn, "-o", killed, "--threadpool-count", "2", "--resume")
    assert second.returncode == 0, second.stderr
    assert "finished earlier, verified and kept" in second.stderr
    for name in sorted(os.listdir(clean)):
        if name != "conversion_report.json":
            with open(os.path.join(clean, name), "rb") as f, open(os.path.join(killed, name), "rb") as g:
                assert f.read() == g.read(), name


def test_autoawq_source_equals_its_dequantization(tmp_path):
    """AutoAWQ GEMM 4-bit experts (--input-type awq): dequantized by the pre-stage on the way."""
    from quantized_fixtures import awq_dequantize, awq_pack, awq_quantize, write_two_shards

    bf16 = synthetic(str(tmp_path / "bf16"))
    main_, scales, reference = {}, {}, {}
    for name, value in load(bf16).items():
        if ".mlp.experts." not in name:
            main_[name] = reference[name] = value
            continue
        module = name.rpartition(".")[0]
        q, zeros, s = awq_quantize(value, 32)
        main_.update({f"{module}.qweight": awq_pack(q), f"{module}.qzeros": awq_pack(zeros)})
        scales[f"{module}.scales"] = s
        reference[name] = awq_dequantize(q, zeros, s, 32).to(torch.bfloat16)
    qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": ["self_attn", "mlp.gate", "lm_head", "embed_tokens"]}
    awq = write_two_shards(bf16, str(tmp_path / "awq"), main_, scales, qc)
    ref = str(tmp_path / "ref")
    os.makedirs(ref)
    save_file(reference, os.path.join(ref, "model.safetensors"))
    with open(os.path.join(bf16, "config.json")) as f, open(os.path.join(ref, "config.json"), "w") as g:
        g.write(f.read())
    assert kt("-i", awq, "-o", str(tmp_path / "a"), "--input-type", "awq", "--quant-method", "int8") == 0
    assert kt("-i", ref, "-o", str(tmp_path / "b"), "--quant-method", "int8") == 0
    a, b = _experts(str(tmp_path / "a")), _experts(str(tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_raw_mode_with_many_files_resumes_after_a_kill(tmp_path):
    """192 raw .kt files: the manifest is saved every 2 s, not after each file, so a kill loses the
    most recent records; --resume rebuilds those files and the result is still byte-identical."""
    src = synthetic(str(tmp_path / "src"), inter=512, experts=4)
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    flags = ("--threadpool-count", "4", "--no-merge-safetensor")
    assert kt("-i", src, "-o", clean, *flags) == 0
    assert _cli("-i", src, "-o", killed, *flags, fault="kill_after=120").returncode == -9
    with open(os.path.join(killed, "conversion_manifest.json")) as f:
        recorded = sum(r["done"] for r in json.load(f)["files"].values())
    assert recorded <= 120
    second = _cli("-i", src, "-o", killed, *flags, "--resume")
    assert second.returncode == 0, second.stderr
    for dirpath, _, names in os.walk(clean):
        for name in names:
            if name.endswith(".kt"):
                rel = os.path.relpath(os.path.join(dirpath, name), clean)
                with open(os.path.join(clean, rel), "rb") as f, open(os.path.join(killed, rel), "rb") as g:
                    assert f.read() == g.read(), rel
    with open(os.path.join(killed, "conversion_manifest.json")) as f:
        assert all(r["done"] for r in json.load(f)["files"].values())


def test_a_large_manifest_is_saved_at_most_every_few_seconds(tmp_path):
    from convert_checkpoint.manifest import FileRecord, Manifest

    manifest = Manifest(str(tmp_path / "m.json"), "fp", {f"f{i}": FileRecord(1) for i in range(Manifest.SAVE_EACH_UP_TO + 1)})
    manifest.mark_done("f0", 1, "h", [])
    manifest.mark_done("f1", 1, "h", [])  # within SAVE_SECONDS of the first save: not written yet
    with open(tmp_path / "m.json") as f:
        assert [k for k, r in json.load(f)["files"].items() if r["done"]] == ["f0"]
    manifest.save()
    with open(tmp_path / "m.json") as f:
        assert sum(r["done"] for r in json.load(f)["files"].values()) == 2
