"""Model-free quantization in AMD Quark's format, byte-identical to amd-quark 0.13's file-to-file
output (``quantize_model_per_safetensor``) on CPU.

``build(scheme, targets, ignore)`` returns the converters (one) for a scheme:

===============  =========================================================================
``fp8``          e4m3 per tensor: ``weight`` e4m3 (out, in), ``weight_scale`` fp32 ``[]``
``ptpc_fp8``     e4m3 per output channel: ``weight`` e4m3, ``weight_scale`` fp32 (out,)
``mxfp4``        OCP MXFP4, groups of 32: ``weight`` u8 (out, in/2), ``weight_scale`` u8 e8m0 (out, in/32)
``int4_wo_128``  int4 symmetric, groups of 128: ``weight`` int32 (in, out/8), ``weight_scale`` fp32 (out, in/128)
``int4_fp8``     W4A8, progressive: FP8 per tensor, then int4 per channel on the FP8 values:
                 ``weight`` int32 (out, in/8) in AWQ nibble order, ``weight_scale`` fp32 ``[]`` (stage 1),
                 ``weight_scale_2`` fp32 (out,) (stage 2)
===============  =========================================================================

The math is Quark's (``model_free_quant.md`` §2.4), checked byte for byte against amd-quark 0.13
by ``compat/quark_check.py``:

* FP8 per tensor: ``s = fp32(amax)/448`` (0 -> fp32 eps), codes ``e4m3(clamp(W / s, ±448))``
  where ``W / s`` is a bf16 weight over a 0-dim fp32 scale (fp32 math, rounded to the weight dtype).
* FP8 per channel: the same scale per row, stored in fp32, but the codes are ``W / s.to(W.dtype)``.
* INT4 symmetric: ``s = max(amax / 7.5, eps32)`` computed in amax's dtype, then fp32; codes
  ``clamp(round_half_even(fp32(W) * (1/s)), -8, 7)`` (a reciprocal multiply).
* MXFP4: Quark's ``even_round`` shared exponent (``emax`` 2), ``W / s`` in fp32 rounded to the
  E2M1 grid (nearest, ties to even, saturating at 6); scale bytes ``round(log2 max(s, 2^-126)) + 127``.
* int4_fp8: stage 1 is FP8 per tensor as above; stage 2 is INT4 per channel on ``fp32(W8)``.

What is quantized: every ``*.weight`` that Quark takes for a Linear weight (2-D, the module does
not end in ``norm`` nor contain ``embed``), selected by ``targets`` (default: all) and not by
``ignore``, nor by the default not-quantized set, the same as the compressed-tensors side:
embeddings, ``lm_head``, norms, MoE routers and shared-expert gates (``mlp.gate``, ``router``,
``shared_expert_gate``), MTP ``eh_proj``, vision towers. A module named exactly in ``targets``
overrides that default set. ``quantization_config`` is what Quark writes, with ``exclude`` the sorted
exact names of the Linear-like modules left unquantized (Quark resolves its globs the same way).

**Where Quark and vLLM's Quark loader disagree** (§2.6), we follow Quark's bytes by default: the
point of this converter is a drop-in replacement whose output equals what the tool people use
writes (and compare against). Where that output is not loadable, an option changes the layout:

* ``int4_wo_128``: Quark writes ``weight`` int32 (in, out/8) in natural nibble order and
  ``weight_scale`` (out, in/g), while declaring ``export.pack_method: "reorder"``. vLLM's
  ``QuarkW4A16Int4`` (read from its source, not run here) creates ``weight`` (in, out/8),
  ``weight_scale`` (in/g, out) and an optional ``weight_zero_point``, and decodes the nibbles in
  the AWQ order that ``pack_method: "reorder"`` declares (``canonicalize_quark_packed_int4``). So
  Quark's scale fails that loader's shape check, and even a square one would scramble the codes.
  ``int4_layout="vllm"`` (``build(..., int4_layout="vllm")``) writes the same codes and scales in
  the loader's layout: nibbles in AWQ order, ``weight_scale`` transposed to (in/g, out).
* ``fp8``: Quark's scheme declares static per-tensor input scales, but file-to-file writes no
  ``input_scale`` (there is no calibration data), and so do we (Quark's bytes); serve
  ``ptpc_fp8`` (dynamic activations) instead.
* ``int4_fp8``: vLLM loads it only for MoE experts (ROCm AITER); dense layers raise
  ``NotImplementedError`` there. We write it wherever Quark does; restrict it with ``targets``.
* ``ptpc_fp8`` on an fp16 source: a row whose ``amax/448`` underflows fp16 (``amax`` below about
  1.3e-5, not zero) gets its scale rounded to 0 before the division, so Quark writes ±448 codes
  and NaN codes for the row's zeros. We reproduce it byte for byte; bf16 and fp32 sources are not
  affected.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from ..errors import ConversionError
from .names import matches_any, split_param

SCHEMES = ("fp8", "ptpc_fp8", "mxfp4", "int4_wo_128", "int4_fp8")
INT4_LAYOUTS = ("quark", "vllm")
QUARK_VERSION = "0.13"

# the default not-quantized set (on top of embeddings and norms, which are never candidates)
DEFAULT_IGNORE = (
    r"re:(.*\.)?lm_head$",
    r"re:(.*\.)?(gate|router)$",  # MoE routers (mlp.gate, block_sparse_moe.gate, mlp.router)
    r"re:.*shared_expert_gate$",
    r"re:.*eh_proj$",  # MTP
    r"re:(.*\.)?(visual|vision_tower|vision_model|vision_encoder|multi_modal_projector)(\..*)?$",
)

_EPS32 = torch.finfo(torch.float32).eps
_FP8_MAX = 448.0
_GROUP = {"mxfp4": 32, "int4_wo_128": 128}


# --- quantization_config as amd-quark 0.13 writes it -----------------------------------------

def _tensor_config(dtype: str, qscheme: str, *, dynamic: bool = False, ch_axis: int | None = None,
                   group_size: int | None = None, symmetric: bool | None = True, scale_type: str = "float",
                   scale_format: str | None = None, scale_calculation_mode: str | None = None,
                   observer: str) -> dict:
    return {"dtype": dtype, "is_dynamic": dynamic, "qscheme": qscheme, "ch_axis": ch_axis, "group_size": group_size,
            "block_size": None, "symmetric": symmetric, "round_method": "half_even", "scale_type": scale_type,
            "zero_point_type": "int32", "scale_format": scale_format, "scale_calculation_mode": scale_calculation_mode,
            "mx_element_dtype": None, "observer_cls": observer, "is_scale_quant": False,
            "enable_buffer_reuse": False, "max_input_numel": 4194304}


def _fp8_tensor(dynamic: bool = False, scale_type: str = "float") -> dict:
    return _tensor_config("fp8_e4m3", "per_tensor", dynamic=dynamic, scale_type=scale_type,
                          observer="PerTensorMinMaxObserver")


def _mxfp4(dynamic: bool) -> dict:
    return _tensor_config("fp4", "per_group", dynamic=dynamic, ch_axis=-1, group_size=32, symmetric=None,
                          scale_format="e8m0", scale_calculation_mode="even", observer="PerBlockMXObserver")


def _layer_config(scheme: str) -> dict:
    """``global_quant_config`` of the scheme (Quark's ``QuantizationSchemeCollection``)."""
    weight: dict | list
    if scheme == "fp8":
        weight, inputs = _fp8_tensor(), _fp8_tensor()
    elif scheme == "ptpc_fp8":
        weight = _tensor_config("fp8_e4m3", "per_channel", ch_axis=0, observer="PerChannelMinMaxObserver")
        inputs = _tensor_config("fp8_e4m3", "per_channel", dynamic=True, ch_axis=1, observer="PerChannelMinMaxObserver")
    elif scheme == "mxfp4":
        weight, inputs = _mxfp4(False), _mxfp4(True)
    elif scheme == "int4_wo_128":
        weight = _tensor_config("int4", "per_group", ch_axis=-1, group_size=128, observer="PerGroupMinMaxObserver")
        inputs = None
    elif scheme == "int4_fp8":
        weight = [_fp8_tensor(scale_type="float32"),
                  _tensor_config("int4", "per_channel", ch_axis=0, scale_type="float32",
                                 observer="PerChannelMinMaxObserver")]
        inputs = _fp8_tensor(dynamic=True, scale_type="float32")
    else:
        raise ConversionError(f"unknown Quark scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return {"input_tensors": inputs, "output_tensors": None, "weight": weight, "bias": None, "target_device": None}


def quantization_config(scheme: str, exclude: Iterable[str], pack_method: str = "reorder") -> dict:
    return {"global_quant_config": _layer_config(scheme), "exclude": sorted(set(exclude)), "algo_config": None,
            "softmax_quant_spec": None, "quant_method": "quark", "layer_type_quant_config": {},
            "layer_quant_config": {}, "kv_cache_quant_config": {}, "kv_cache_post_rope": False,
            "quant_mode": "eager_mode", "version": QUARK_VERSION,
            "export": {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": pack_method,
                       "weight_format": "real_quantized", "weight_merge_groups": None}}


# --- the math ------------------------------------------------------------------------------

def _amax(w: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max(|min|, max) in the weight's dtype (exact), as Quark's min/max observers."""
    if dim is None:
        lo, hi = w.min(), w.max()
    else:
        lo, hi = w.amin(dim=dim), w.amax(dim=dim)
    return torch.maximum(-torch.clamp(lo, max=0), torch.clamp(hi, min=0))


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    s = amax.float() / _FP8_MAX
    return s.masked_fill(s == 0, _EPS32)


def fp8_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, 0-dim fp32 scale)."""
    s = fp8_scale(_amax(w))
    return torch.clamp(w / s, -_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn), s


def fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, fp32 scale (out,)); the codes use the scale rounded to the weight's dtype."""
    s = fp8_scale(_amax(w.float(), 1))
    q = torch.clamp(w / s.to(w.dtype)[:, None], -_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


def int4_scale(amax: torch.Tensor) -> torch.Tensor:
    s = amax / 7.5
    return torch.max(s, torch.tensor(_EPS32, dtype=s.dtype)).to(torch.float32)


def int4_codes(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7]: round half to even of ``fp32(x) * (1/s)``."""
    return torch.clamp(torch.round(x.float() * (1.0 / s)), -8, 7).to(torch.int8)


def int4_per_group(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (out, in), fp32 scale (out, in/group))."""
    out, cols = w.shape
    g = w.reshape(out, cols // group, group)
    s = int4_scale(_amax(g, 2))
    q = int4_codes(g, s[:, :, None]).reshape(out, cols)
    return q, s


def pack_int4(q: torch.Tensor, reorder: bool) -> torch.Tensor:
    """Quark's ``Pack_4_bits``: 8 nibbles per int32 along the last dim (zero-padded), nibble ``i``
    from element ``order[i]`` (``[0,2,4,6,1,3,5,7]`` when ``reorder``), two's complement."""
    rows, cols = q.shape
    nib = q.to(torch.int32) & 0xF
    if cols % 8:
        nib = torch.cat([nib, torch.zeros(rows, -cols % 8, dtype=torch.int32)], dim=1)
    nib = nib.reshape(rows, -1, 8)
    order = (0, 2, 4, 6, 1, 3, 5, 7) if reorder else tuple(range(8))
    packed = nib[:, :, order[0]].clone()
    for i in range(1, 8):  # int32 shifts wrap the top nibble into the sign bit, as Quark's do
        packed |= nib[:, :, order[i]] << (4 * i)
    return packed


def mx_scale(amax: torch.Tensor) -> torch.Tensor:
    """Quark's ``even_round`` for fp4 (mbits 1, emax 2): a power of two, fp32."""
    a = amax.float()
    zero = a == 0
    nan = torch.isnan(a)
    bits = a.contiguous().view(torch.int32) + (1 << 21)
    bits = bits & (((1 << 9) - 1) << 23)
    f = bits.view(torch.float32).masked_fill(zero, 2.0 ** -126).masked_fill(nan, float("nan"))
    s = torch.exp2(torch.clamp(torch.floor(torch.log2(f)) - 2, -127, 127))
    return s.masked_fill(s == 0, _EPS32)


def fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (sign bit 3) of fp32 ``x``: nearest grid value, ties to the even code, saturating
    at 6; zero is always +0 (code 0), as Quark packs it. Below 1 the code is ``round(2|x|)`` (half
    to even); from 1 to 6 it is the fp32 bits rounded to one mantissa bit (half to even), whose
    exponent and mantissa bit are the code's."""
    a = x.abs().clamp_(max=6.0)
    bits = a.view(torch.int32)
    normal = ((bits + (0x1FFFFF + ((bits >> 22) & 1))) >> 22) - 252  # 1.0 (127 << 23) -> code 2
    code = torch.where(a < 1, torch.round(a * 2).to(torch.int32), normal)
    code = code.masked_fill_(torch.isnan(a), 7).to(torch.uint8)
    return code | (((x < 0) & (code > 0)).to(torch.uint8) << 3)


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u8 packed (out, in/2), u8 e8m0 scale (out, in/32))."""
    out, cols = w.shape
    g = w.reshape(out, cols // 32, 32)
    s = mx_scale(_amax(g, 2))
    codes = fp4_codes(g.float() / s[:, :, None]).reshape(out, cols)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    e8m0 = (torch.round(torch.log2(torch.clamp(s, min=2.0 ** -126))).to(torch.int16).clamp(-127, 127) + 127)
    return packed.contiguous(), e8m0.to(torch.uint8)


# --- the converter -------------------------------------------------------------------------

def is_linear_weight(name: str) -> bool:
    """Quark's name test for a Linear weight (the shape test, 2-D or more, comes on top)."""
    module, param = split_param(name)
    return bool(module) and param == "weight" and not module.endswith("norm") and "embed" not in module


class QuarkQuantizer:
    """One Quark scheme over a checkpoint (see the module docstring)."""

    def __init__(self, scheme: str, targets: Iterable[str] = (), ignore: Iterable[str] = (),
                 int4_layout: str = "quark"):
        if scheme not in SCHEMES:
            raise ConversionError(f"unknown Quark scheme {scheme!r} (known: {', '.join(SCHEMES)})")
        if int4_layout not in INT4_LAYOUTS:
            raise ConversionError(f"quark: int4_layout {int4_layout!r} is not one of {', '.join(INT4_LAYOUTS)}")
        self.scheme = scheme
        self.targets = tuple(t for t in targets if t != "Linear")
        self.ignore = tuple(ignore)
        self.int4_layout = int4_layout
        self.label = f"quark:{scheme}"
        self.excluded: set[str] = set()  # Linear-like modules seen and left unquantized

    # selection
    def _explicit(self, module: str) -> bool:
        return bool(self.targets) and matches_any(module, self.targets)

    def _selected(self, module: str) -> bool:
        if matches_any(module, self.ignore):
            return False
        if self.targets:
            if not matches_any(module, self.targets):
                return False
            if module in self.targets:  # named exactly: overrides the default set
                return True
        return not matches_any(module, DEFAULT_IGNORE)

    def _quantizes(self, name: str, t: torch.Tensor) -> bool:
        module, param = split_param(name)
        if param != "weight" or not module:
            return False
        linear = is_linear_weight(name)
        if not self._selected(module):
            if linear and t.dim() >= 2:
                self.excluded.add(module)
            return False
        if not linear or t.dim() != 2:
            if self._explicit(module) and (not linear or t.dim() != 2):
                what = "an embedding or norm" if not linear else f"{t.dim()}-D {list(t.shape)}"
                raise ConversionError(f"quark {self.scheme}: {name} is {what}; only 2-D Linear weights can be quantized")
            if linear and t.dim() > 2:  # fused experts left as they are: listed, so no loader takes them for quantized
                self.excluded.add(module)
            return False
        if not t.dtype.is_floating_point or t.dtype.itemsize < 2:
            raise ConversionError(f"quark {self.scheme}: {name} is {str(t.dtype).replace('torch.', '')}, "
                                  "not bf16/fp16/fp32 (dequantize it first with a converter in front)")
        out, cols = t.shape
        group = _GROUP.get(self.scheme)
        if group and cols % group:
            raise ConversionError(f"quark {self.scheme}: {name} {list(t.shape)}: input dimension {cols} "
                                  f"is not divisible by the group size {group}")
        return True

    def get_dependencies(self, weight_name: str) -> set[str]:
        return set()

    def _outputs(self, name: str, t: torch.Tensor) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out, cols = t.shape
        s = self.scheme
        if s == "fp8":
            return {name: (torch.float8_e4m3fn, (out, cols)), f"{name}_scale": (torch.float32, ())}
        if s == "ptpc_fp8":
            return {name: (torch.float8_e4m3fn, (out, cols)), f"{name}_scale": (torch.float32, (out,))}
        if s == "mxfp4":
            return {name: (torch.uint8, (out, cols // 2)), f"{name}_scale": (torch.uint8, (out, cols // 32))}
        if s == "int4_wo_128":
            scale = (cols // 128, out) if self.int4_layout == "vllm" else (out, cols // 128)
            return {name: (torch.int32, (cols, -(-out // 8))), f"{name}_scale": (torch.float32, scale)}
        return {name: (torch.int32, (out, -(-cols // 8))), f"{name}_scale": (torch.float32, ()),
                f"{name}_scale_2": (torch.float32, (out,))}

    def validate(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result = {}
        for name, t in tensors.items():
            if self._quantizes(name, t):
                for n, (dtype, shape) in self._outputs(name, t).items():
                    result[n] = torch.empty(shape, dtype=dtype, device="meta")
            else:
                result[name] = t
        return result

    def process(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result = {}
        for name, t in tensors.items():
            if self._quantizes(name, t):
                result.update(self.quantize(name, t))
            else:
                result[name] = t
        return result

    def quantize(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.scheme
        if s == "fp8":
            q, scale = fp8_per_tensor(w)
            return {name: q, f"{name}_scale": scale}
        if s == "ptpc_fp8":
            q, scale = fp8_per_channel(w)
            return {name: q, f"{name}_scale": scale.contiguous()}
        if s == "mxfp4":
            packed, e8m0 = mxfp4(w)
            return {name: packed, f"{name}_scale": e8m0}
        if s == "int4_wo_128":
            q, scale = int4_per_group(w, 128)
            if self.int4_layout == "vllm":
                return {name: pack_int4(q.t(), True), f"{name}_scale": scale.t().contiguous()}
            return {name: pack_int4(q.t(), False), f"{name}_scale": scale.contiguous()}
        w8, s1 = fp8_per_tensor(w)
        v = w8.float()
        s2 = int4_scale(_amax(v, 1))
        q = int4_codes(v, s2[:, None])
        return {name: pack_int4(q, True), f"{name}_scale": s1, f"{name}_scale_2": s2}

    def update_config(self, config):
        """Quark's config; ``exclude`` lists the Linear-like modules that ``validate`` (which the
        pipeline runs on every group first) saw and left unquantized."""
        return quantization_config(self.scheme, self.excluded)

    def update_model_config(self, config: dict) -> dict:
        """Quark deletes every nested ``quantization_config`` (e.g. in ``text_config``); the
        root one is the chain's."""
        config = copy.deepcopy(config)
        for value in config.values():
            if isinstance(value, dict):
                _drop_quantization_config(value)
        return config


def _drop_quantization_config(config: dict) -> None:
    config.pop("quantization_config", None)
    for value in config.values():
        if isinstance(value, dict):
            _drop_quantization_config(value)


def build(scheme: str, targets: list[str], ignore: list[str], *, int4_layout: str = "quark") -> list[QuarkQuantizer]:
    """The converters for ``convert-checkpoint quantize --format quark --scheme SCHEME``:
    ``targets``/``ignore`` are module names or ``re:`` patterns (empty targets: every Linear
    weight); ``int4_layout`` is ``quark`` (amd-quark's bytes) or ``vllm`` (see the module doc)."""
    return [QuarkQuantizer(scheme, targets, ignore, int4_layout=int4_layout)]
