"""An independent oracle of kt-kernel's AMX INT4/INT8 packing, written from the layout spec
(shared/reference/kt_torchdist.md A.4) element by element in numpy, sharing no code with
``quant/kt_amx``: every output byte's position is computed from its (row, column) directly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from convert_checkpoint.quant import kt_amx

F32 = np.float32


def oracle_scales(f: np.ndarray, bits: int, ieee: bool) -> np.ndarray:
    amax = np.abs(f).max(axis=1).astype(F32) + F32(0)  # -0.0 + 0 = +0.0
    if bits == 8:
        return (amax / F32(127)).astype(F32) if ieee else (amax * F32(1 / 127)).astype(F32)
    return (amax.astype(np.float64) / 112.0).astype(F32)


def oracle_codes(f: np.ndarray, d: np.ndarray, bits: int) -> np.ndarray:
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    q = np.clip(np.rint((f * inv[:, None]).astype(F32)), -128, 127).astype(np.int32)  # rint: half to even
    if bits == 4:
        q = np.sign(q) * (((np.abs(q) + 8) & 0xF0) >> 4)
    return q


def byte_position(r: int, b: int, n: int, kb: int, nb: int, kblk: int) -> int:
    """Where byte column ``b`` of row ``r`` lands: blocks of nb rows x kblk bytes (rows outer),
    in a block tiles of 32 rows x 64 bytes (row tiles outer), in a tile two halves of 16 rows,
    each a 16x16 transpose of 4-byte groups."""
    r0 = r // nb * nb
    rows = min(nb, n - r0)
    c0 = b // kblk * kblk
    cols = min(kblk, kb - c0)
    pos = r0 * kb + c0 * rows  # earlier blocks of this row band come first
    rr, cc = r - r0, b - c0
    tile = (rr // 32) * (cols // 64) + cc // 64
    half, row16 = (rr % 32) // 16, rr % 16
    group, byte = (cc % 64) // 4, cc % 4
    return pos + tile * 2048 + half * 1024 + group * 64 + row16 * 4 + byte


def oracle_pack(w: torch.Tensor, bits: int, ieee: bool = False) -> tuple[np.ndarray, np.ndarray]:
    f = w.to(torch.float32).numpy()
    n, k = f.shape
    d = oracle_scales(f, bits, ieee)
    q = oracle_codes(f, d, bits)
    if bits == 8:
        row_bytes = (q & 0xFF).astype(np.uint8)
    else:
        row_bytes = np.zeros((n, k // 2), dtype=np.uint8)
        for c in range(k):
            group, t = divmod(c, 128)
            nibble = q[:, c] & 0xF
            col = group * 64 + (t % 64)
            row_bytes[:, col] |= (nibble << (4 if t >= 64 else 0)).astype(np.uint8)
    kb = row_bytes.shape[1]
    nb, kblk = (64, 3584) if bits == 8 else (128, 1792)
    out = np.zeros(n * kb, dtype=np.uint8)
    for r in range(n):
        for b in range(kb):
            out[byte_position(r, b, n, kb, nb, kblk)] = row_bytes[r, b]
    return out, d


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0] = 0  # zero row
    w[1] = torch.arange(k, dtype=torch.float32).remainder(64) - 31.5  # halves, amax 127 below
    w[1, 0] = 127
    w[2] = (torch.arange(k, dtype=torch.float32).remainder(32) - 15.5) * 0.5  # INT4 halves of 16d steps
    w[2, 0] = 56
    w[3] *= 1e4
    return w.to(torch.bfloat16)


# Shapes with several and partial N blocks (INT8 NB 64, INT4 NB 128) and K blocks (3584 / 1792 bytes).
CASES = [(8, 32, 64), (8, 96, 7232), (8, 64, 192), (4, 32, 128), (4, 160, 3712), (4, 32, 384)]


@pytest.mark.parametrize("bits,n,k", CASES)
def test_packing_matches_the_spec_oracle(bits, n, k):
    w = _weights(n, k, seed=n + k)
    scheme = kt_amx.INT8 if bits == 8 else kt_amx.INT4
    weight, scale = kt_amx.encode(w, scheme)
    want, d = oracle_pack(w, bits)
    assert weight.dtype == torch.int8 and scale.dtype == torch.float32
    assert np.array_equal(scale.numpy().view(np.uint32), d.view(np.uint32))  # bits: +0.0, not -0.0
    got = weight.view(torch.uint8).numpy()
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"{int((got != want).sum())} bytes differ"
    back = kt_amx.decode(weight, scale, n, k, scheme)
    err = (back - w.float()).abs()
    assert bool(kt_amx.within_bound(err, w.float(), kt_amx.error_bound(scale, scheme)[:, None]).all())
    assert float(err.max()) > 0  # the bound is exercised, not vacuous


def test_int8_scale_is_the_fast_math_product_not_the_quotient():
    # bf16 maxima where fl32(a * fl32(1/127)) != fl32(a / 127): the two builds of kt-kernel differ here.
    a = torch.arange(1, 20000, dtype=torch.float32).mul(0.01).to(torch.bfloat16).float()
    fast = kt_amx.row_scales(a, kt_amx.INT8)
    ieee = kt_amx.row_scales(a, kt_amx.INT8, ieee=True)
    assert np.array_equal(fast.numpy(), (a.numpy() * F32(1 / 127)).astype(F32))
    assert np.array_equal(ieee.numpy(), (a.numpy() / F32(127)).astype(F32))
    assert int((fast != ieee).sum()) > 0


def test_int4_double_rounding_is_half_away_from_zero_of_the_rounded_code():
    d = 1.0  # amax 112 -> d = 1
    row = torch.zeros(1, 128)
    row[0, 0] = 112
    row[0, 1], row[0, 2], row[0, 3] = 23.5, -23.5, 24.0  # q8 24 -> v 2; RNE(23.5/16) would be 1
    q, scale = kt_amx.quantize(row.to(torch.bfloat16), kt_amx.INT4)
    assert float(scale[0]) == d
    assert q[0, :4].tolist() == [7, 2, -2, 2]
