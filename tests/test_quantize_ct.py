"""`convert-checkpoint quantize`: model-free quantization to compressed-tensors.

Bytes are checked against an independent path: compressed-tensors' module lifecycle
(``initialize_module_for_quantization`` + ``compress_module`` on an ``nn.Linear``) fed with
qparams from a min-max computed here; transformers with compressed-tensors loads the output.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from fixtures import read_tree
from quantized_fixtures import make_modelopt_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import TinySpec, make_fp8_checkpoint

from convert_checkpoint.cli import main
from convert_checkpoint.manifest import MANIFEST_NAME

SCHEMES = ("FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "W8A16", "W4A16", "W4A16_ASYM", "NVFP4A16", "MXFP4A16", "MXFP4",
           "MXFP8A16")
KEEP_OUT = {MANIFEST_NAME, "conversion_report.json"}


def quantize(src: str, dst: str, *extra: str) -> int:
    return main(["quantize", src, dst, "--no_progress", *extra])


def tensors_of(root: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(root, name)))
    return out


def weight_map(root: str) -> dict[str, str]:
    with open(os.path.join(root, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


def qconfig(root: str) -> dict:
    with open(os.path.join(root, "config.json")) as f:
        return json.load(f)["quantization_config"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    """A bf16 Llama wide enough for group 128 (hidden 128, intermediate 256)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = str(tmp_path_factory.mktemp("q") / "llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=256, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory) -> str:
    """DeepSeek-V3 (MLA, routed + shared experts, MTP) in bf16, its layer-1 partners in a second shard."""
    from tiny_models import make_tiny_model

    base = str(tmp_path_factory.mktemp("q") / "dsv3")
    make_tiny_model(TinySpec("deepseek_v3", dtype=torch.bfloat16, num_layers=2, mtp_layers=1), base)
    return base


def split_two_shards(src: str, dst: str, second) -> str:
    """``src`` rewritten as two shards: the tensors for which ``second(name)`` holds go to the second."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and not name.endswith(".index.json"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    tensors = tensors_of(src)
    files = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if not second(k)},
             "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if second(k)}}
    for file, part in files.items():
        save_file(part, os.path.join(dst, file), metadata={"format": "pt"})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: f for f, t in files.items() for n in t}}, f)
    return dst


# --- the independent reference ------------------------------------------------------------

def _reference_min_max(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "channel":
        return w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    if strategy in ("group", "tensor_group"):
        g = w.unflatten(1, (-1, args.group_size))
        return g.min(dim=2).values, g.max(dim=2).values
    assert strategy == "block"
    bh, bw = args.block_structure
    rows, cols = -(-w.shape[0] // bh), -(-w.shape[1] // bw)
    low = torch.zeros(rows, cols, dtype=w.dtype)
    high = torch.zeros(rows, cols, dtype=w.dtype)
    for r in range(rows):
        for c in range(cols):
            block = w[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw]
            pad = block.numel() < bh * bw  # zero padding, as the observer pads
            low[r, c] = min(block.min(), 0) if pad else block.min()
            high[r, c] = max(block.max(), 0) if pad else block.max()
    return low, high


def reference(w: torch.Tensor, preset: str, rounding: str, fused: list[torch.Tensor] | None = None) -> dict:
    """compressed-tensors' module path: an nn.Linear quantized and compressed by the library."""
    from compressed_tensors.compressors import compress_module
    from compressed_tensors.quantization import initialize_module_for_quantization, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    dtype = w.dtype if rounding == "weight_dtype" else torch.float32
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    initialize_module_for_quantization(linear, scheme, force_zero_point=False)
    gs = None
    if str(getattr(args.strategy, "value", args.strategy)) == "tensor_group":
        amax = max(t.abs().max() for t in (fused or [w]))
        gs = generate_gparam(-amax.reshape(1), amax.reshape(1))
    low, high = _reference_min_max(w, args)
    scale, zp = calculate_qparams(low, high, args, global_scale=gs)
    with torch.no_grad():
        linear.weight_scale.copy_(scale.to(w.dtype))
        if not args.symmetric:
            linear.weight_zero_point.copy_(zp)
        if gs is not None:
            linear.weight_global_scale.copy_(gs)
    compress_module(linear)
    out = {k: v.detach() for k, v in linear.state_dict().items()}
    if "weight_scale" in out and out["weight_scale"].dtype == torch.float32 and w.dtype != torch.float32:
        out["weight_scale"] = out["weight_scale"].to(w.dtype)  # stored in the weight's dtype
    return out


def assert_same(ours: dict, module: str, ref: dict) -> None:
    for key, value in ref.items():
        got = ours[f"{module}.{key}"]
        assert got.dtype == value.dtype and torch.equal(got, value), f"{module}.{key}"


# --- bytes, config -------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_bytes_equal_library_compressors(llama, tmp_path, scheme):
    src = tensors_of(llama)
    for rounding in ("fp32", "weight_dtype") if scheme in ("FP8_DYNAMIC", "W4A16") else ("fp32",):
        out = str(tmp_path / rounding)
        assert quantize(llama, out, "--scheme", scheme, "--rounding", rounding, "--ignore", "lm_head") == 0
        ours = tensors_of(out)
        attn = "model.layers.1.self_attn"
        qkv = [src[f"{attn}.{p}_proj.weight"] for p in "qkv"]
        for module in (f"{attn}.k_proj", "model.layers.0.mlp.down_proj"):
            w = src[f"{module}.weight"]
            fused = qkv if "k_proj" in module else None
            assert_same(ours, module, reference(w, scheme, rounding, fused))
        assert ours["model.embed_tokens.weight"].dtype == torch.bfloat16  # not quantized
        assert torch.equal(ours["lm_head.weight"], src["lm_head.weight"])
    from compressed_tensors.quantization import preset_name_to_scheme

    qc = qconfig(out)
    expected = preset_name_to_scheme(scheme, ["Linear"]).model_dump()
    expected.pop("format")
    group = dict(qc["config_groups"][scheme])
    assert group.pop("format") == qc["format"]
    assert json.loads(json.dumps(group)) == json.loads(json.dumps(expected, default=str))
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head", "model.embed_tokens"]  # the user's list, then what stayed dense
    assert qc["version"] and qc["transform_config"] == {}


def test_rounding_modes_differ_only_by_the_quotient(llama, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert quantize(llama, a, "--scheme", "FP8_DYNAMIC") == 0
    assert quantize(llama, b, "--scheme", "FP8_DYNAMIC", "--rounding", "weight_dtype") == 0
    ta, tb = tensors_of(a), tensors_of(b)
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(ta[f"{name}.weight_scale"], tb[f"{name}.weight_scale"])
    differ = (ta[f"{name}.weight"].view(torch.uint8) != tb[f"{name}.weight"].view(torch.uint8)).float().mean()
    assert 0 < differ < 0.1


# --- shared global scales, partners in another shard ---------------------------------------

def test_nvfp4_global_scales_shared_across_shards(dsv3, tmp_path):
    second = ("self_attn.kv_a_proj_with_mqa", "mlp.up_proj", "experts.1.up_proj", "shared_experts.up_proj")
    src = split_two_shards(dsv3, str(tmp_path / "src"), lambda n: n.startswith(("model.layers.1.", "model.layers.0."))
                           and any(s in n for s in second))
    out = str(tmp_path / "out")
    assert quantize(src, out, "--scheme", "NVFP4A16") == 0
    t, wm, src_map = tensors_of(out), weight_map(out), weight_map(src)
    gs = "weight_global_scale"
    pairs = [("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
             ("model.layers.1.self_attn.q_a_proj", "model.layers.1.self_attn.kv_a_proj_with_mqa"),
             ("model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.shared_experts.up_proj"),
             ("model.layers.2.mlp.shared_experts.gate_proj", "model.layers.2.mlp.shared_experts.up_proj")]
    pairs += [(f"model.layers.1.mlp.experts.{e}.gate_proj", f"model.layers.1.mlp.experts.{e}.up_proj") for e in range(4)]
    raw = tensors_of(dsv3)
    for a, b in pairs:
        assert torch.equal(t[f"{a}.{gs}"], t[f"{b}.{gs}"]), (a, b)
        amax = torch.maximum(raw[f"{a}.weight"].abs().max(), raw[f"{b}.weight"].abs().max())
        assert t[f"{a}.{gs}"].item() == pytest.approx(448 * 6 / amax.item(), rel=1e-2)
        for module in (a, b):  # each output stays in its source tensor's shard
            assert wm[f"{module}.weight_packed"] == src_map[f"{module}.weight"], module
    assert not torch.equal(t[f"model.layers.1.mlp.experts.0.gate_proj.{gs}"], t[f"model.layers.1.mlp.experts.1.gate_proj.{gs}"])
    # not quantized by default: router, eh_proj, MTP head, embeddings, norms
    for name in ("model.layers.1.mlp.gate.weight", "model.layers.2.eh_proj.weight", "model.layers.2.shared_head.head.weight",
                 "model.embed_tokens.weight", "model.layers.1.self_attn.kv_a_layernorm.weight", "lm_head.weight"):
        assert torch.equal(t[name], raw[name]), name
    qc = qconfig(out)
    for module in ("lm_head", "model.layers.1.mlp.gate", "model.layers.2.eh_proj", "model.layers.2.shared_head.head"):
        assert module in qc["ignore"]


def test_qkv_share_and_match_library(tiny_hf, tmp_path):
    hf = tiny_hf(TinySpec("qwen3_moe", dtype=torch.bfloat16, num_layers=2))
    out = str(tmp_path / "out")
    assert quantize(hf, out, "--scheme", "NVFP4A16") == 0
    t, raw = tensors_of(out), tensors_of(hf)
    attn = "model.layers.0.self_attn"
    qkv = [raw[f"{attn}.{p}_proj.weight"] for p in "qkv"]
    for p in "qkv":
        assert_same(t, f"{attn}.{p}_proj", reference(raw[f"{attn}.{p}_proj.weight"], "NVFP4A16", "fp32", qkv))
    assert torch.equal(t[f"{attn}.q_proj.weight_global_scale"], t[f"{attn}.v_proj.weight_global_scale"])


# --- fused 3-D experts ----------------------------------------------------------------------

def _expert_checkpoint(root: str, fused: str | None, moe_inter: int = 48, hidden: int = 64, experts: int = 3) -> str:
    """A synthetic MoE layer: per-expert 2-D weights, or fused 3-D ones ("plain" [E, 2I, H] /
    [E, H, I], "flipped" [E, H, 2I] / [E, I, H])."""
    gen = torch.Generator().manual_seed(3)
    gate = torch.randn(experts, moe_inter, hidden, generator=gen).to(torch.bfloat16)
    up = torch.randn(experts, moe_inter, hidden, generator=gen).to(torch.bfloat16)
    down = torch.randn(experts, hidden, moe_inter, generator=gen).to(torch.bfloat16)
    prefix = "model.layers.0.mlp.experts."
    if fused is None:
        tensors = {f"{prefix}{e}.{n}.weight": w[e].contiguous() for e in range(experts)
                   for n, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down))}
    elif fused == "plain":
        tensors = {f"{prefix}gate_up_proj": torch.cat([gate, up], 1), f"{prefix}down_proj": down}
    else:
        tensors = {f"{prefix}gate_up_proj": torch.cat([gate, up], 1).transpose(1, 2).contiguous(),
                   f"{prefix}down_proj": down.transpose(1, 2).contiguous()}
    os.makedirs(root)
    save_file(tensors, os.path.join(root, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"model_type": "qwen3_moe", "hidden_size": hidden, "moe_intermediate_size": moe_inter,
                   "intermediate_size": 256, "num_experts": experts}, f)
    return root


def test_fused_3d_experts_both_layouts(tmp_path):
    per_expert = _expert_checkpoint(str(tmp_path / "per"), None)
    assert quantize(per_expert, str(tmp_path / "per_out"), "--scheme", "NVFP4A16") == 0
    want = tensors_of(str(tmp_path / "per_out"))
    for layout in ("plain", "flipped"):
        src = _expert_checkpoint(str(tmp_path / layout), layout)
        out = str(tmp_path / f"{layout}_out")
        assert quantize(src, out, "--scheme", "NVFP4A16") == 0
        got = tensors_of(out)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (layout, k)
    g = "model.layers.0.mlp.experts.1.{}_proj.weight_global_scale"
    assert torch.equal(want[g.format("gate")], want[g.format("up")])


def test_ambiguous_expert_layout_is_an_error(tmp_path, capsys):
    src = _expert_checkpoint(str(tmp_path / "amb"), "plain", moe_inter=32, hidden=64)
    out = str(tmp_path / "out")
    assert_fails_quantize(capsys, quantize(src, out, "--scheme", "NVFP4A16"), out,
                          "model.layers.0.mlp.experts.gate_up_proj", "ambiguous")


# --- a real client loads it ------------------------------------------------------------------

def _dequantized_logits(quantized: str, tmp_path) -> torch.Tensor:
    """Logits of the model rebuilt from our dequantized weights (dequantize pre-stage, fp32)."""
    from transformers import AutoModelForCausalLM

    deq = str(tmp_path / "deq")
    assert main(["hf", quantized, deq, "--converter", "dequantize:dtype=float32", "--no_progress"]) == 0
    model = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.arange(24).reshape(2, 12)).logits


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4A16", "FP8_BLOCK", "MXFP4A16", "W8A8"])
def test_transformers_loads_llama(llama, tmp_path, scheme):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = str(tmp_path / "out")
    assert quantize(llama, out, "--scheme", scheme) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    with torch.no_grad():
        logits = model(torch.arange(24).reshape(2, 12)).logits
    assert torch.equal(logits, _dequantized_logits(out, tmp_path))
    original = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    with torch.no_grad():
        base = original(torch.arange(24).reshape(2, 12)).logits
    # tiny random weights (std 0.02) are hard on 4 bits: mean |error| within 25% (4-bit), 6% (8-bit)
    bound = 0.06 if "8" in scheme else 0.25
    assert (logits - base).abs().mean() < bound * base.abs().mean()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_transformers_loads_moe(tiny_hf, dsv3, tmp_path, family):
    """Qwen3-MoE and DeepSeek-V3 (MLA, shared experts, an MTP layer transformers skips), FP8_DYNAMIC.
    transformers dequantizes the fused experts in bf16 (the other weights are exact), hence 1e-3.
    (Its NVFP4 expert loading ignores weight_global_scale, in transformers 5.24: not used here.)"""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    hf = tiny_hf(TinySpec("qwen3_moe", dtype=torch.bfloat16, num_layers=2)) if family == "qwen3_moe" else dsv3
    out = str(tmp_path / "out")
    assert quantize(hf, out, "--scheme", "FP8_DYNAMIC") == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    with torch.no_grad():
        logits = model(torch.arange(24).reshape(2, 12)).logits
    assert (logits - _dequantized_logits(out, tmp_path)).abs().max() < 1e-3


# --- pre-stages ------------------------------------------------------------------------------

def _one_pass_equals_two_steps(src: str, scheme: str, work) -> None:
    """``--converter dequantize`` + quantize in one pass writes what dequantizing to a bf16
    checkpoint and then quantizing it writes."""
    one, deq, two = str(work / f"one_{scheme}"), str(work / f"deq_{scheme}"), str(work / f"two_{scheme}")
    assert quantize(src, one, "--scheme", scheme, "--converter", "dequantize") == 0
    assert main(["hf", src, deq, "--converter", "dequantize", "--no_progress"]) == 0
    assert quantize(deq, two, "--scheme", scheme) == 0
    assert read_tree(one, KEEP_OUT) == read_tree(two, KEEP_OUT)


def test_prestage_chains_equal_two_steps(llama, dsv3, tmp_path):
    w4 = str(tmp_path / "w4")
    assert quantize(llama, w4, "--scheme", "W4A16") == 0
    w4_dir = tmp_path / "from_w4"
    w4_dir.mkdir()
    _one_pass_equals_two_steps(w4, "NVFP4A16", w4_dir)  # compressed-tensors W4A16 -> NVFP4
    _one_pass_equals_two_steps(w4, "MXFP4A16", w4_dir)  # ... -> MXFP4 (the Kimi-K2 route)
    nv_dir = tmp_path / "from_modelopt"
    nv_dir.mkdir()
    _one_pass_equals_two_steps(make_modelopt_checkpoint(llama, str(tmp_path / "nv")), "FP8_BLOCK", nv_dir)
    fp8_dir = tmp_path / "from_fp8"
    fp8_dir.mkdir()
    _one_pass_equals_two_steps(make_fp8_checkpoint(dsv3, str(tmp_path / "fp8")), "NVFP4A16", fp8_dir)  # DeepSeek FP8


# --- resume, dry run --------------------------------------------------------------------------

def test_killed_quantize_resumes_to_identical_bytes(dsv3, tmp_path):
    src = split_two_shards(dsv3, str(tmp_path / "src"), lambda n: n.startswith("model.layers.1."))
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert quantize(src, whole, "--scheme", "NVFP4A16") == 0
    env = dict(os.environ, CONVERT_CHECKPOINT_FAULT="kill_after=1")
    cmd = [sys.executable, "-m", "convert_checkpoint", "quantize", src, killed, "--scheme", "NVFP4A16", "--no_progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    env.pop("CONVERT_CHECKPOINT_FAULT")
    proc = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 finished earlier" in proc.stderr
    assert read_tree(killed, KEEP_OUT) == read_tree(whole, KEEP_OUT)


def test_dry_run_writes_nothing_and_lists_what_stays_dense(dsv3, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert quantize(dsv3, out, "--scheme", "NVFP4A16", "--dry_run") == 0
    assert not os.path.exists(out) or os.listdir(out) == []
    text = capsys.readouterr().out
    assert "not quantized (lm_head): lm_head, model.layers.2.shared_head.head" in text
    assert "not quantized (router/gate): model.layers.1.mlp.gate, model.layers.2.mlp.gate" in text
    assert "not quantized (MTP eh_proj): model.layers.2.eh_proj" in text
    assert "not quantized (embedding): model.embed_tokens, model.layers.2.embed_tokens" in text


# --- bad input --------------------------------------------------------------------------------

def assert_fails_quantize(capsys, rc: int, out_dir: str, *fragments: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("convert-checkpoint quantize: error: "), err[0]
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not os.path.exists(out_dir) or os.listdir(out_dir) == [], "output was written"


def test_bad_input(tiny_hf, llama, tmp_path, capsys):
    hf = tiny_hf(TinySpec("qwen3_moe", dtype=torch.bfloat16, num_layers=2))
    out = str(tmp_path / "out")
    cases = [
        ((llama, out, "--scheme", "W3A77"), ("unknown scheme 'W3A77'",)),
        ((hf, out, "--scheme", "W4A16"), ("model.layers.0.", "not divisible by the group size 128")),
        ((llama, out, "--scheme", "FP8_DYNAMIC", "--targets", "re:.*layernorm$"),
         ("model.layers.0.input_layernorm.weight is 1-D",)),
        ((llama, out, "--scheme", "FP8"), ("static input activations",)),
        ((llama, out, "--scheme", "NVFP4"), ("static input activations",)),
        ((llama, out, "--scheme", "W4A16", "--config", "{}"), ("exactly one of --scheme and --config",)),
    ]
    w4 = str(tmp_path / "w4")
    assert quantize(llama, w4, "--scheme", "W4A16") == 0
    cases.append(((w4, out, "--scheme", "NVFP4A16"), ("already quantized", "--converter dequantize")))
    if not torch.cuda.is_available():
        cases.append(((llama, out, "--scheme", "W4A16", "--device", "cuda"), ("CUDA is not available",)))
    for argv, fragments in cases:
        capsys.readouterr()
        assert_fails_quantize(capsys, quantize(*argv), out, *fragments)


def test_format_quark_dispatches(llama, tmp_path, capsys):
    out = str(tmp_path / "out")
    try:
        import convert_checkpoint.converters.quantize_quark  # noqa: F401
    except ImportError:
        assert_fails_quantize(capsys, quantize(llama, out, "--scheme", "fp8", "--format", "quark"), out, "not available")
        return
    assert quantize(llama, out, "--scheme", "fp8", "--format", "quark", "--ignore", "lm_head") == 0
    assert qconfig(out)["quant_method"] == "quark"  # the bytes: tests/test_quantize_quark.py
    bad = str(tmp_path / "bad")
    capsys.readouterr()
    assert_fails_quantize(capsys, quantize(llama, bad, "--scheme", "fp8", "--format", "quark", "--rounding", "weight_dtype"),
                          bad, "--format quark has its own rounding")
    # --int4_layout vllm: the same codes and scales as the default layout, in vLLM's loader's layout
    layouts = {}
    for layout in ("quark", "vllm"):
        d = str(tmp_path / layout)
        assert quantize(llama, d, "--scheme", "int4_wo_128", "--format", "quark", "--int4_layout", layout) == 0
        layouts[layout] = tensors_of(d)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(layouts["vllm"][f"{name}_scale"], layouts["quark"][f"{name}_scale"].t())
    assert not torch.equal(layouts["vllm"][name], layouts["quark"][name])  # nibbles in AWQ order
    capsys.readouterr()
    assert_fails_quantize(capsys, quantize(llama, bad, "--scheme", "W4A16", "--int4_layout", "vllm"), bad,
                          "--int4_layout is for --format quark")


def test_config_groups_and_python_api(llama, tmp_path):
    from convert_checkpoint import model_free_ptq

    config = {"config_groups": {"attn": {"targets": ["re:.*self_attn\\..*_proj$"], "scheme": "NVFP4A16"},
                                "mlp": {"targets": ["re:.*mlp\\..*_proj$"], "scheme": "W4A16"}},
              "ignore": ["lm_head"]}
    out = str(tmp_path / "out")
    model_free_ptq(llama, out, config=config, progress=False)
    t, qc = tensors_of(out), qconfig(out)
    assert qc["format"] == "mixed-precision"
    assert qc["config_groups"]["attn"]["format"] == "nvfp4-pack-quantized"
    assert qc["config_groups"]["mlp"]["format"] == "pack-quantized"
    assert t["model.layers.0.self_attn.o_proj.weight_packed"].dtype == torch.uint8
    assert t["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32
    one = str(tmp_path / "one")
    model_free_ptq(llama, one, scheme="W4A16", ignore=["lm_head"], progress=False)
    cli = str(tmp_path / "cli")
    assert quantize(llama, cli, "--scheme", "W4A16", "--ignore", "lm_head") == 0
    with safe_open(os.path.join(one, "model.safetensors"), "pt") as a, safe_open(os.path.join(cli, "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
