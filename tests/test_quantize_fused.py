"""quant/ct_fused (observer, scale and codes as one compiled GPU function) gives the library's bytes.

Its formulas run eagerly here, against compressed-tensors' own path (the min-max observer,
``calculate_qparams``, the compressors). On a GPU the same expressions are compiled; the GPU
checks (benchmarks/quantize_cuda_check.py, quantize_benchmark.py --check-bytes) compare those bytes
with the CPU's. Inputs: values placed on every rounding threshold and tie (E2M1 grid, e4m3
midpoints, int8 halves, clamps, signed zeros, all-zero rows and groups) and random weights.
"""
from __future__ import annotations

import pytest
import torch

from convert_checkpoint.converters.quantize_ct import build_quantizer
from convert_checkpoint.quant import ct_fused

FUSED = ["FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "NVFP4A16"]


def both_paths(w: torch.Tensor, name: str, gs: torch.Tensor | None = None) -> tuple[dict, dict]:
    """(ct_fused's output, the library path's output) for one weight."""
    quantizer = build_quantizer({}, ["m.weight"], None, scheme=name)
    group = quantizer.groups[0]
    if name == "NVFP4A16" and gs is None:
        gs = quantizer._global_scales({"m.weight": w}, {"m.weight": group}, meta=False)["m.weight"]
    got = ct_fused.quantize(w, group.scheme, gs, compiled=False)
    want = quantizer.quantize_on_device(w, group, gs, fused=False)
    return got, want


def assert_identical(got: dict | None, want: dict) -> None:
    assert got is not None, "ct_fused does not cover this case"
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        assert torch.equal(got[key].contiguous().view(torch.uint8), want[key].contiguous().view(torch.uint8)), key


# Magnitudes on and around every E2M1 threshold (0.25 0.75 1.25 1.75 2.5 3.5 5), the e4m3 tie
# 1.0625 (between 1 and 1.125), int8 halves, values past each clamp, and zeros of both signs.
_EDGES = [0.0, -0.0, 0.1, 0.25, 0.2500001, 0.5, 0.74, 0.75, 1.0, 1.0625, 1.25, 1.5, 1.75, 2.0, 2.5, 2.6, 3.0, 3.5,
          4.0, 5.0, 5.01, 6.0, 7.5, 100.5, 127.5, 128.5, 300.0, 448.0, 464.0, 1000.0]


def edge_weight(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    values = torch.tensor(_EDGES + [-v for v in _EDGES if v != 0.0], dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    w = values[torch.randint(len(values), (rows, cols), generator=g)]
    # rows whose largest magnitude pins the scale so that x / s lands on the thresholds above:
    # 448 (FP8: s = 1), 127.5 (INT8: s = 1), 6 (NVFP4 with a global scale of 448: s = 1)
    w[0::4, 0] = 448.0
    w[1::4, 0] = 127.5
    w[2::4, :] = torch.where(w[2::4, :].abs() > 6, torch.full_like(w[2::4, :], 6.0), w[2::4, :])
    w[3, :] = 0.0  # an all-zero row: the epsilon scale
    w[5, :16] = -0.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", FUSED)
def test_edge_values_equal_library(name, dtype):
    w = edge_weight(256, 256, dtype)
    got, want = both_paths(w, name)
    assert_identical(got, want)
    if name == "NVFP4A16":  # the edges do reach the cases they are for
        rows_of_six = w[2::4].float()
        got6, want6 = both_paths(rows_of_six.to(dtype), name, torch.tensor([448.0]))
        assert_identical(got6, want6)
        assert (want6["weight_packed"] & 0x0F == 0x08).any()  # a negative value rounded to zero keeps its sign


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", FUSED)
def test_random_weights_equal_library(name, dtype):
    g = torch.Generator().manual_seed(0)
    for shape, std in (((384, 256), 0.02), ((128, 512), 3.0), ((256, 128), 1e-4)):
        w = (torch.randn(shape, generator=g) * std).to(dtype)
        assert_identical(*both_paths(w, name))


def test_quantizer_uses_it_and_it_falls_back_where_it_does_not_cover():
    g = torch.Generator().manual_seed(0)
    names = ["layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight"]
    tensors = {n: (torch.randn(384, 256, generator=g) * 0.02).to(torch.bfloat16) for n in names}
    quantizer = build_quantizer({}, names, None, scheme="NVFP4A16")
    library = quantizer.process(dict(tensors))
    group = quantizer.groups[0]
    gs = quantizer._global_scales(tensors, {n: group for n in names}, meta=False)
    for n in names:  # the shared q/k global scale goes through unchanged
        module = n[: -len(".weight")]
        got = quantizer.quantize_on_device(tensors[n], group, gs[n], fused=True)
        assert_identical(got, {k[len(module) + 1:]: v for k, v in library.items() if k.startswith(module + ".")})
    w = torch.randn(200, 256).to(torch.bfloat16)  # 200 rows: not whole 128-row blocks
    assert ct_fused.quantize(w, build_quantizer({}, ["m.weight"], None, scheme="FP8_BLOCK").groups[0].scheme,
                             None, compiled=False) is None
    for name in ("W4A16", "W4A16_ASYM", "MXFP4A16", "MXFP8A16", "W8A16", "MXFP4"):
        scheme = build_quantizer({}, ["m.weight"], None, scheme=name).groups[0].scheme
        assert ct_fused.quantize(w, scheme, None, compiled=False) is None, name
    # weight_dtype rounding never takes the fused path (the library divides in bf16 there)
    wd = build_quantizer({}, ["m.weight"], None, scheme="FP8_DYNAMIC", rounding="weight_dtype")
    assert not torch.equal(wd.quantize_on_device(w, wd.groups[0], None, fused=True)["weight"].view(torch.uint8),
                           ct_fused.quantize(w, wd.groups[0].scheme, None, compiled=False)["weight"].view(torch.uint8))


def test_global_scale_equals_library():
    from compressed_tensors.quantization.utils import generate_gparam

    g = torch.Generator().manual_seed(3)
    members = [(torch.randn(64, 32, generator=g) * s).to(torch.bfloat16) for s in (0.02, 0.5, 0.01)]
    members[1][3, 4] = -7.25  # the largest magnitude is a negative value in the second member
    amax = torch.tensor(7.25, dtype=torch.bfloat16)
    want = generate_gparam(-amax.reshape(1), amax.reshape(1))
    got = ct_fused.nvfp4_global_scale(members, compiled=False)
    assert got.dtype == want.dtype and torch.equal(got, want)
    zeros = ct_fused.nvfp4_global_scale([torch.zeros(4, 16, dtype=torch.bfloat16)], compiled=False)
    assert torch.equal(zeros, torch.ones(1))  # no magnitude: the library's fallback of 1
