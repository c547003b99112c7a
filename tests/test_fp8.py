"""Block-scaled FP8 end to end: the quantizer against its formulas, TE pickles without TE, and
HF FP8 <-> MCore FP8 conversions (kept bit for bit, requantized where a cut splits a block)."""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import struct
import zipfile

import numpy as np
import pytest
import torch

from convert_checkpoint import tensor_expr as te
from convert_checkpoint.cli import main
from convert_checkpoint.formats import stand_in_pickle
from convert_checkpoint.quant import te_pickle
from convert_checkpoint.quant.fp8_block import Fp8Recipe, dequantize_blocks, quantize_blocks, scales_are_pow2
from convert_checkpoint.quant.te_pickle import Fp8BlockRecord
from fixtures import load_hf_tensors
from helpers import assert_same_tensors, bits, hf_to_mcore, mcore_to_hf, rank_files
from tiny_models import DEEPSEEK_FP8, TinySpec, make_fp8_checkpoint

WIDE = TinySpec("deepseek_v3", mtp_layers=1, wide=True, dtype=torch.bfloat16)
LAYOUT = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, expert_parallel_size=2)


# --- the quantizer against the formulas (formats.md §2, §3) -------------------------------

def _f32(x: float) -> float:
    return float(np.float32(x))


def _ceil_to_ue8m0(sf: float) -> float:
    """DeepGEMM's bit trick: the smallest power of two >= sf, exponent clamped to [1, 254]."""
    (b,) = struct.unpack("<I", struct.pack("<f", sf))
    exp = ((b >> 23) & 0xFF) + (1 if b & 0x7FFFFF else 0)
    return 2.0 ** (min(max(exp, 1), 254) - 127)


_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _rne_e4m3(v: float) -> int:
    """Nearest finite e4m3 code to v (ties to the even code), by search over all 254 finite codes."""
    best = None
    for code in range(256):
        value = _E4M3_VALUES[code].item()
        if value != value or (value == 0 and code == 0x80):  # NaN codes, and -0 (ties with +0)
            continue
        key = (abs(value - v), code & 1)
        if best is None or key < best[0]:
            best = (key, code)
    return best[1]


def _block_input(amax: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(128, 128, generator=gen) * 2 - 1) * amax
    x[5, 7] = amax
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("pow2", [True, False])
def test_scales_follow_the_formulas(pow2):
    amaxes = [1e-4, 3.7e-3, 0.0625, 0.9, 1.0, 447.9, 448.0, 3000.0, 1.5e4]
    x = torch.cat([_block_input(a, i) for i, a in enumerate(amaxes)], dim=1)  # 1 x 9 blocks
    codes, scale = quantize_blocks(x, Fp8Recipe(pow2=pow2))
    assert scale.shape == (1, len(amaxes)) and scale.dtype == torch.float32
    for j in range(len(amaxes)):
        amax = x[:, 128 * j:128 * (j + 1)].float().abs().max().item()
        if pow2:  # TE's floor-pow2 of 448/amax equals DeepGEMM's ceil_to_ue8m0(amax/448)
            want = _ceil_to_ue8m0(_f32(amax / 448.0))
        else:  # TE: S = RN(448/amax), s = RN(1/S)
            want = _f32(1.0 / _f32(np.float32(448.0) / np.float32(amax)))
        assert scale[0, j].item() == want, (j, amax, scale[0, j].item(), want)
    assert scales_are_pow2(scale) == pow2
    # Codes: RNE of x/s onto the e4m3 grid (checked on a sample against an independent search).
    gen = torch.Generator().manual_seed(7)
    for _ in range(300):
        i, k = torch.randint(0, 128, (1,), generator=gen).item(), torch.randint(0, 128 * len(amaxes), (1,), generator=gen).item()
        s = scale[0, k // 128].item()
        assert codes[i, k].view(torch.uint8).item() == _rne_e4m3(_f32(x[i, k].float().item() / s)) or \
            codes[i, k].float().item() == _E4M3_VALUES[_rne_e4m3(_f32(x[i, k].float().item() / s))].item()


def test_edge_blocks_zero_epsilon_and_overflow():
    x = torch.zeros(128, 512, dtype=torch.float32)
    x[:, 128:256] = 1e-6  # amax below the epsilon
    x[0, 256] = float("inf")  # an infinite element: scale 1, code saturates at 448
    x[1, 256] = 1000.0
    x[:, 384:] = torch.linspace(-2, 2, 128)
    x[3, 400] = float("nan")  # NaN does not count towards amax and stays NaN
    codes, scale = quantize_blocks(x, Fp8Recipe(pow2=True, amax_epsilon=1e-4))
    # All-zero block: zero codes and a finite scale (the epsilon's; TE's 1 without one), never NaN.
    assert scale[0, 0].item() == _ceil_to_ue8m0(_f32(1e-4 / 448)) and torch.all(bits(codes[:, :128]) == 0)
    zero_codes, zero_scale = quantize_blocks(torch.zeros(128, 128), Fp8Recipe(pow2=False))
    assert zero_scale.item() == 1.0 and torch.all(bits(zero_codes) == 0)
    assert scale[0, 1].item() == _ceil_to_ue8m0(_f32(1e-4 / 448))  # the floor, not 1e-6, sets the scale
    assert scale[0, 2].item() == 1.0  # inf amax: S = 1
    assert codes[0, 256].float().item() == 448.0 and codes[1, 256].float().item() == 448.0  # clamped, not NaN
    assert scale[0, 3].item() == _ceil_to_ue8m0(_f32(2 / 448))
    assert torch.isnan(codes[3, 400].float()) and not torch.isnan(codes[4, 400].float())
    without_eps, scale0 = quantize_blocks(x[:, 128:256], Fp8Recipe(pow2=True))
    assert scale0.item() == _ceil_to_ue8m0(_f32(1e-6 / 448)) and torch.all(torch.isfinite(without_eps.float()))


def test_dequantize_and_requantize_are_exact_for_pow2():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(300, 260, generator=gen) * torch.logspace(-3, 3, 260)).to(torch.bfloat16)
    codes, scale = quantize_blocks(x)
    values = dequantize_blocks(codes, scale)
    assert torch.equal(values.to(torch.bfloat16).float(), values)  # pow2 scales: exact in bf16
    again_codes, again_scale = quantize_blocks(values)
    assert torch.equal(dequantize_blocks(again_codes, again_scale), values)  # values survive a requantization
    err = (values - x.float()).abs()
    s = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    # Half an e4m3 ulp: at most 2^-4 of the value for normals, 2^-10·s in the subnormal range.
    assert torch.all(err <= torch.maximum(x.float().abs() * 2 ** -4, s * 2 ** -10))


# --- TE pickles without TE ----------------------------------------------------------------

def _pickle_globals(path: str) -> set[str]:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    found = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
    return found


def _reduce_count(path: str) -> int:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return sum(1 for op, _, _ in pickletools.genops(data) if op.name == "REDUCE")


def test_te_pickle_layout_and_restricted_reader(tmp_path):
    x = torch.randn(300, 260).to(torch.bfloat16)
    codes, scale = quantize_blocks(x)
    path = str(tmp_path / "rank.pt")
    te_pickle.save({"model": {"w": te_pickle.blockwise_param(codes, scale, torch.bfloat16, True, 1e-4),
                              "norm": torch.ones(4)}}, path)
    assert _pickle_globals(path) >= {te_pickle.REBUILD_PATH, te_pickle.QUANTIZER_PATH, te_pickle.DTYPE_PATH}
    # 3 tensors x (_rebuild_tensor_v2, OrderedDict), torch.Size, TE's rebuild, and DType(7) once:
    # the tensor and its quantizer share one DType object, as in TE's own pickles.
    assert _reduce_count(path) == 3 * 2 + 1 + 1 + 1
    rec = te_pickle.load(path)["model"]["w"]
    assert isinstance(rec, Fp8BlockRecord)
    assert rec.shape == (300, 260) and rec.rowwise_data.dtype == torch.uint8
    assert tuple(rec.rowwise_scale_inv.shape) == (3, 4)  # TE pads the 3 scale columns to 4
    assert torch.equal(bits(rec.codes), bits(codes)) and torch.equal(rec.scale_inv, scale)
    assert rec.nominal_dtype == torch.bfloat16 and rec.fp8_dtype == 7 and rec.is_2d_scaled
    assert rec.quantizer == {"rowwise_usage": True, "columnwise_usage": False, "internal": False,
                             "optimize_for_gemm": False, "dtype": 7, "block_len": 128, "force_pow_2_scales": True,
                             "amax_epsilon": 1e-4, "block_scaling_dim": 2}
    # With TE imported, its real classes are registered under the same names; ours must win.
    def impostor(*args):
        raise AssertionError("the reader reached another registration of TE's rebuild function")

    torch.serialization.add_safe_globals([(impostor, te_pickle.REBUILD_PATH)])
    try:
        assert isinstance(te_pickle.load(path)["model"]["w"], Fp8BlockRecord)
        assert (impostor, te_pickle.REBUILD_PATH) in torch.serialization.get_safe_globals()  # restored
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(te_pickle._ALLOWED)
    # TE <= 2.9 wrote the classmethod through getattr and the pybind11 DType enum: read as well.
    legacy = str(tmp_path / "legacy.pt")
    te_pickle.save({"model": {"w": _LegacyParam(codes, scale)}}, legacy)
    assert "__builtin__.getattr" in _pickle_globals(legacy)  # protocol 2 writes Python 2 names, as TE's files do
    old = te_pickle.load(legacy)["model"]["w"]
    assert torch.equal(bits(old.codes), bits(codes)) and torch.equal(old.scale_inv, scale) and old.fp8_dtype == 7


class _LegacyParam:
    """What TE <= 2.9 pickled: ``getattr(Float8BlockwiseQTensor, '_make_in_reduce_ex')(9 args)``."""

    def __init__(self, codes, scale):
        self.param = te_pickle.blockwise_param(codes, scale)

    def __reduce_ex__(self, protocol):
        p = self.param
        return (_LegacyRebuild(), (p.shape, p.rowwise_data, p.rowwise_scale_inv, None, None, _LegacyEnum(7), p.dtype,
                                   stand_in_pickle.InstanceValue(stand_in_pickle.Global(te_pickle.QUANTIZER_PATH), p.quantizer_state), True))


class _LegacyRebuild:
    def __call__(self, *a):
        raise AssertionError

    def __reduce_ex__(self, protocol):
        return (getattr, (stand_in_pickle.Global(te_pickle.TENSOR_CLASS_PATH), "_make_in_reduce_ex"))


def _LegacyEnum(value):  # pybind11 enum: NEWOBJ(cls) then BUILD(int)
    return stand_in_pickle.InstanceValue(stand_in_pickle.Global(te_pickle.LEGACY_DTYPE_PATH), value)


def test_reader_refuses_code_in_a_checkpoint(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    mcore = tmp_path / "mc" / "release" / "mp_rank_00"
    mcore.mkdir(parents=True)
    (tmp_path / "mc" / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save({"model": {"x": Evil()}}, str(mcore / "model_optim_rng.pt"), pickle_module=pickle)
    rc = mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "out"))
    assert rc == 2 and not (tmp_path / "out").exists()


# --- conversions --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_bf16(tiny_hf):
    return tiny_hf(WIDE)


@pytest.fixture(scope="module")
def fp8_hf(wide_bf16, tmp_path_factory):
    return make_fp8_checkpoint(wide_bf16, str(tmp_path_factory.mktemp("fp8") / "hf"))


def _records(mcore_dir: str) -> dict[tuple[str, str], object]:
    return {(d, n): v for d, sd in rank_files(mcore_dir).items() for n, v in sd["model"].items()}


def test_hf_fp8_to_mcore_fp8_and_back_is_bit_exact(fp8_hf, tmp_path, capsys):
    mc, back = str(tmp_path / "mc"), str(tmp_path / "back")
    assert hf_to_mcore(fp8_hf, mc, **LAYOUT) == 0
    assert "FP8: 204 tensors kept bit for bit, 0 requantized, 0 quantized" in capsys.readouterr().err
    recs = _records(mc)
    hf = load_hf_tensors(fp8_hf)
    # TP rank 1 of layer 0's attention output projection: columns 128:256 of o_proj, whole blocks.
    proj = recs[("mp_rank_01_000_000", "decoder.layers.0.self_attention.linear_proj.weight")]
    assert isinstance(proj, Fp8BlockRecord)
    assert torch.equal(bits(proj.codes), bits(hf["model.layers.0.self_attn.o_proj.weight"][:, 128:]))
    assert torch.equal(proj.scale_inv, hf["model.layers.0.self_attn.o_proj.weight_scale_inv"][:, 1:])
    # Not FP8: embeddings, norms, router (bf16), expert bias (fp32), MTP eh_proj (bf16).
    for (d, n), v in recs.items():
        if v is None:
            continue
        fp8 = isinstance(v, Fp8BlockRecord)
        if n.endswith(("layer_norm_weight", "word_embeddings.weight", "router.weight", "eh_proj.weight")):
            assert not fp8 and v.dtype == torch.bfloat16, n
        if n.endswith("expert_bias"):
            assert v.dtype == torch.float32, n
        if ".experts." in n or n.endswith(("linear_proj.weight", "linear_q_up_proj.weight", "linear_fc2.weight")):
            assert fp8, n
    args = rank_files(mc)["mp_rank_00_000_000"]["args"]
    assert (args.fp8, args.fp8_recipe, args.fp8_param_gather) == ("e4m3", "blockwise", True)

    assert mcore_to_hf(mc, back) == 0
    assert "0 requantized" in capsys.readouterr().err
    assert_same_tensors(hf, load_hf_tensors(back))
    config = json.load(open(os.path.join(back, "config.json")))
    assert config["quantization_config"] == json.load(open(os.path.join(fp8_hf, "config.json")))["quantization_config"]


def test_yaml_fp8_marks_match_deepseeks_fp8_tensors(fp8_hf, wide_bf16, tmp_path):
    """--convert_to_fp8 quantizes exactly the tensors DeepSeek publishes in FP8."""
    mc, back = str(tmp_path / "mc"), str(tmp_path / "back")
    assert hf_to_mcore(wide_bf16, mc, tensor_model_parallel_size=2) == 0
    assert mcore_to_hf(mc, back, convert_to_fp8=True) == 0
    out = load_hf_tensors(back)
    fp8_names = {n for n, v in out.items() if v.dtype == torch.float8_e4m3fn}
    assert fp8_names == {n for n in load_hf_tensors(wide_bf16) if DEEPSEEK_FP8.fullmatch(n)}
    src = load_hf_tensors(wide_bf16)
    for name in fp8_names:  # MCore bf16 -> HF FP8 is our reference quantizer on the HF tensor
        codes, scale = quantize_blocks(src[name])
        assert torch.equal(bits(out[name]), bits(codes)) and torch.equal(out[name + "_scale_inv"], scale), name
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    qc = json.load(open(os.path.join(back, "config.json")))["quantization_config"]
    assert qc == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                  "weight_block_size": [128, 128]}


def test_bf16_to_mcore_fp8_quantizes_each_shard(wide_bf16, tmp_path, capsys):
    mc = str(tmp_path / "mc")
    assert hf_to_mcore(wide_bf16, mc, tensor_model_parallel_size=2, convert_to_fp8=True, amax_epsilon="1e-6") == 0
    assert "0 requantized, 134 quantized from bf16" in capsys.readouterr().err  # 67 per TP rank
    recs = _records(mc)
    src = load_hf_tensors(wide_bf16)
    recipe = Fp8Recipe(amax_epsilon=1e-6)
    for rank, cols in ((0, slice(0, 128)), (1, slice(128, 256))):  # row-parallel shards quantized on their own
        rec = recs[(f"mp_rank_0{rank}", "decoder.layers.2.self_attention.linear_proj.weight")]
        codes, scale = quantize_blocks(src["model.layers.2.self_attn.o_proj.weight"][:, cols], recipe)
        assert torch.equal(bits(rec.codes), bits(codes)) and torch.equal(rec.scale_inv, scale)
        assert torch.equal(dequantize_blocks(rec.codes, rec.scale_inv), dequantize_blocks(codes, scale))
        assert rec.amax_epsilon == 1e-6
    # kv_down (192 rows, not a multiple of 128) is replicated under TE: one whole tensor per rank.
    rec = recs[("mp_rank_01", "decoder.layers.0.self_attention.linear_kv_down_proj.weight")]
    codes, scale = quantize_blocks(src["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"], recipe)
    assert torch.equal(bits(rec.codes), bits(codes)) and torch.equal(rec.scale_inv, scale)


def test_a_cut_through_a_block_is_requantized_and_reported(fp8_hf, tmp_path, capsys):
    """Local spec: MLA's kv_down (192 rows) is split by TP into 96-row shards, cutting a block."""
    mc, back = str(tmp_path / "mc"), str(tmp_path / "back")
    assert hf_to_mcore(fp8_hf, mc, tensor_model_parallel_size=2, transformer_impl="local", dry_run=True) == 0
    assert "requantize decoder.layers.0.self_attention.linear_kv_down_proj.weight" in capsys.readouterr().out
    assert hf_to_mcore(fp8_hf, mc, tensor_model_parallel_size=2, transformer_impl="local") == 0
    err = capsys.readouterr().err
    assert "10 requantized" in err and "the cut at row 96 of 192 falls inside a 128-block" in err
    report = json.load(open(os.path.join(mc, "conversion_report.json")))["fp8"]
    assert report["kept"] == 124 and len(report["requantized"]) == 10 and not report["quantized"]
    assert report["requantized"][0] == {
        "tensor": "decoder.layers.0.self_attention.linear_kv_down_proj.weight",
        "reason": "model.layers.0.self_attn.kv_a_proj_with_mqa.weight: the cut at row 96 of 192 falls inside a 128-block"}
    hf = load_hf_tensors(fp8_hf)
    values = dequantize_blocks(hf["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
                               hf["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"])
    for rank in (0, 1):  # each shard is our quantizer applied to its slice of the dequantized source
        rec = _records(mc)[(f"mp_rank_0{rank}", "decoder.layers.0.self_attention.linear_kv_down_proj.weight")]
        codes, scale = quantize_blocks(values[96 * rank:96 * (rank + 1)])
        assert torch.equal(bits(rec.codes), bits(codes)) and torch.equal(rec.scale_inv, scale)
    # Whole-block tensors are still kept bit for bit next to them.
    proj = _records(mc)[("mp_rank_00", "decoder.layers.0.self_attention.linear_proj.weight")]
    assert torch.equal(bits(proj.codes), bits(hf["model.layers.0.self_attn.o_proj.weight"][:, :128]))
    # Back to HF: the two 96-row shards are joined (another cut), requantized, reported; values stay close.
    assert mcore_to_hf(mc, back) == 0
    assert "joined along dim 0 after a part of 96 rows" in capsys.readouterr().err
    out = load_hf_tensors(back)
    again = dequantize_blocks(out["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
                              out["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"])
    assert torch.allclose(again, values, rtol=2 ** -3, atol=1e-6)


def test_force_no_requant_refuses_a_cut(fp8_hf, tmp_path, capsys):
    mc = str(tmp_path / "mc")
    rc = hf_to_mcore(fp8_hf, mc, tensor_model_parallel_size=2, transformer_impl="local", fp8_force_no_requant=True)
    err = capsys.readouterr().err
    assert rc == 2 and "--fp8_force_no_requant" in err and "linear_kv_down_proj" in err and "row 96" in err
    assert not os.path.exists(mc) or os.listdir(mc) == []


def test_scale_style_decides_requantization(fp8_hf, tmp_path, capsys):
    """pow2 source, fp32 scales asked: requantized with TE's fp32 rule (reported); with
    --fp8_force_no_requant the codes and scales are kept as they are."""
    linear, kept = str(tmp_path / "linear"), str(tmp_path / "kept")
    assert hf_to_mcore(fp8_hf, linear, force_pow_2_scales="false") == 0
    err = capsys.readouterr().err
    assert "FP8: 0 tensors kept bit for bit, 67 requantized" in err
    assert "scales are powers of two, --force_pow_2_scales false" in err
    hf = load_hf_tensors(fp8_hf)
    rec = _records(linear)[("mp_rank_00", "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight")]
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    codes, scale = quantize_blocks(dequantize_blocks(hf[name], hf[name + "_scale_inv"]), Fp8Recipe(pow2=False))
    assert torch.equal(bits(rec.codes), bits(codes)) and torch.equal(rec.scale_inv, scale)
    assert not scales_are_pow2(rec.scale_inv) and rec.pow2 is False
    assert hf_to_mcore(fp8_hf, kept, force_pow_2_scales="false", fp8_force_no_requant=True) == 0
    assert "67 tensors kept bit for bit" in capsys.readouterr().err
    rec = _records(kept)[("mp_rank_00", "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight")]
    assert torch.equal(bits(rec.codes), bits(hf[name])) and rec.pow2 is True  # the quantizer says what the scales are


def test_linear_scales_round_trip_and_config(wide_bf16, tmp_path):
    src = make_fp8_checkpoint(wide_bf16, str(tmp_path / "hf_linear"), pow2=False)
    mc, back = str(tmp_path / "mc"), str(tmp_path / "back")
    assert hf_to_mcore(src, mc, **LAYOUT, force_pow_2_scales="false") == 0
    assert mcore_to_hf(mc, back, force_pow_2_scales="false") == 0
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(back))
    assert "scale_fmt" not in json.load(open(os.path.join(back, "config.json")))["quantization_config"]


def test_mcore_fp8_relayout_equals_direct(fp8_hf, tmp_path):
    a, b, direct = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "direct")
    assert hf_to_mcore(fp8_hf, a, **LAYOUT) == 0
    target = dict(tensor_model_parallel_size=1, expert_parallel_size=4, moe_grouped_gemm=True)
    assert main(["--load_platform", "mcore", "--save_platform", "mcore", "--load_ckpt_path", a,
                 "--save_ckpt_path", b, "--no_progress"] + [x for k, v in target.items()
                                                           for x in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]) == 0
    assert hf_to_mcore(fp8_hf, direct, **target) == 0
    got, want = _records(b), _records(direct)
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        if isinstance(w, Fp8BlockRecord):
            assert torch.equal(g.rowwise_data, w.rowwise_data) and torch.equal(g.rowwise_scale_inv, w.rowwise_scale_inv), key
        elif w is not None:
            assert torch.equal(g, w), key


def test_fp8_input_errors(fp8_hf, tmp_path, capsys):
    """A missing scale, a wrong scale grid and an unsupported quantization are named, nothing written."""
    from safetensors.torch import load_file, save_file

    def variant(name, edit_tensors=None, edit_config=None):
        path = tmp_path / name
        path.mkdir()
        for f in os.listdir(fp8_hf):
            data = open(os.path.join(fp8_hf, f), "rb").read()
            (path / f).write_bytes(data)
        if edit_tensors:
            file = path / "model-00002-of-00002.safetensors"
            tensors = load_file(str(file))
            edit_tensors(tensors)
            save_file(tensors, str(file))
            index = json.load(open(path / "model.safetensors.index.json"))
            index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                                   if v != "model-00002-of-00002.safetensors" or k in tensors}
            json.dump(index, open(path / "model.safetensors.index.json", "w"))
        if edit_config:
            config = json.load(open(path / "config.json"))
            edit_config(config)
            json.dump(config, open(path / "config.json", "w"))
        return str(path)

    scale = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    cases = [
        (variant("noscale", lambda t: t.pop(scale)), "has no block scales"),
        (variant("badgrid", lambda t: t.__setitem__(scale, torch.ones(3, 3))), "scale grid must be float32 [2, 2]"),
        (variant("block64", edit_config=lambda c: c["quantization_config"].update(weight_block_size=[64, 64])),
         "weight_block_size [64, 64] is not supported"),
        (variant("ct", edit_config=lambda c: c["quantization_config"].update(quant_method="compressed-tensors")),
         "quant_method 'compressed-tensors' is not supported"),
    ]
    for src, message in cases:
        out = str(tmp_path / ("out_" + os.path.basename(src)))
        assert hf_to_mcore(src, out) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(out)


def test_fp8_cut_expressions():
    """Windows and joins on whole 128-blocks stay FP8; anything else is dequantized with a reason."""
    data = te.source(te.TensorRef("f", "w"), torch.float8_e4m3fn, (384, 256))
    scale = te.source(te.TensorRef("f", "w_scale_inv"), torch.float32, (3, 2))
    w = te.fp8_blocks(data, scale)
    assert isinstance(te.narrow(w, 0, 128, 256), te.Fp8Blocks)
    cut = te.narrow(w, 0, 96, 96)
    assert isinstance(cut, te.Dequantize) and "the cut at row 96 of 384" in cut.reason
    assert isinstance(te.narrow(te.narrow(w, 0, 64, 192), 0, 64, 128), te.Fp8Blocks)  # back on block edges
    assert isinstance(te.cat([w, w], 0), te.Fp8Blocks)
    odd = te.fp8_blocks(te.source(te.TensorRef("f", "v"), torch.float8_e4m3fn, (100, 256)),
                        te.source(te.TensorRef("f", "v_scale_inv"), torch.float32, (1, 2)))
    assert isinstance(te.cat([w, odd], 0), te.Fp8Blocks)  # a short last part is fine
    joined = te.cat([odd, w], 0)
    assert isinstance(joined, te.Cat) and isinstance(te.to_fp8(joined, "unused"), te.Quantize)
    assert "part of 100 rows" in te.to_fp8(joined, "unused").reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour of the GPU flags")
def test_gpu_flags_on_a_cpu_machine(fp8_hf, tmp_path, capsys):
    """--quant_method te without TE falls back to pt (same bytes) with a note; --device cuda
    without a GPU is an error before anything is written."""
    te_out, pt_out = str(tmp_path / "te"), str(tmp_path / "pt")
    flags = dict(tensor_model_parallel_size=2, transformer_impl="local")
    assert hf_to_mcore(fp8_hf, te_out, quant_method="te", **flags) == 0
    assert "using the pt quantizer" in capsys.readouterr().err
    assert hf_to_mcore(fp8_hf, pt_out, **flags) == 0
    for key, rec in _records(pt_out).items():
        if isinstance(rec, Fp8BlockRecord):
            other = _records(te_out)[key]
            assert torch.equal(other.rowwise_data, rec.rowwise_data) and torch.equal(other.rowwise_scale_inv, rec.rowwise_scale_inv)
    gpu_out = str(tmp_path / "gpu")
    assert hf_to_mcore(fp8_hf, gpu_out, device="cuda", **flags) == 2
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err and not os.path.exists(gpu_out)


def test_branch_free_gpu_form_equals_the_cpu_form():
    """The form compiled on GPUs (NaN zeroed unconditionally, no data-dependent branch) gives the
    same bytes as the CPU path, here run eagerly on CPU over adversarial blocks."""
    from convert_checkpoint.quant import fp8_block

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 520, generator=gen) * torch.logspace(-8, 4, 520)
    x[:128, :128] = 0.0
    x[200, 5], x[10, 300], x[140, 140] = float("inf"), float("nan"), 1e30
    for dtype in (torch.bfloat16, torch.float32):
        for recipe in (Fp8Recipe(), Fp8Recipe(pow2=False), Fp8Recipe(amax_epsilon=1e-4)):
            codes, scale = quantize_blocks(x.to(dtype), recipe)
            codes2, multipliers = fp8_block._codes_and_multipliers(x.to(dtype), recipe)
            raw = bits(codes2).clone()
            raw[raw == 0xFF] = 0x7F  # a CPU cast keeps a NaN's sign; CUDA's (like TE's) writes 0x7F
            assert torch.equal(bits(codes), raw) and torch.equal(scale, torch.reciprocal(multipliers))
