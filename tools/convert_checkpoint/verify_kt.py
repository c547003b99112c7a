"""``convert-checkpoint verify-kt DIR --source SRC``: is DIR a KTransformers CPU-expert checkpoint
kt-kernel will read correctly, holding SRC's experts?

DIR is probed as kt-kernel's loader does (safetensors at the top level, else ``_layer_L/_numa_p``
``.kt`` files): the expert count by ``ffn_up_exps.{e}.numa.0.weight`` for e = 0, 1, ... until one
is missing, the part count by ``ffn_up_exps.0.numa.{p}.weight``. Then every MoE layer of the source
must be there with every expert, projection and part, weights int8 and scales fp32 of exactly the
sizes the part count implies (kt-kernel's merged loader copies bytes without checking any of it).
Each part is decoded, the parts reassembled (gate/up by rows, down by columns) and compared with the
source within the format's bound (INT8: d/2, INT4: 8.5 d per element, d the row's scale). Prints
the part count the server must use. Exit 0 when all holds, 1 on any mismatch, 2 on unusable input.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from . import dtypes
from . import tensor_expr as tx
from .dtypes import DType
from .endpoints.kt_cpu import KtCpuTarget, numa_part, raw_file_name, tensor_name
from .endpoints.kt_experts import PROJECTIONS
from .errors import ConversionError
from .formats.safetensors_io import SafetensorsReader, TensorEntry, read_header
from .options import one_line_parser
from .pipeline import build_plan
from .quant import kt_amx
from .requests import KtRequest, PlanRequest, TargetDir
from .tensor_expr import TensorRef

_RAW = re.compile(r"(INT4|INT8)_(gate|up|down)_(\d+)_(\d+)Byte_(quant|scale)_\.kt")


class Stored:
    """The tensors of a KT directory, by kt-kernel's tensor names."""

    def __init__(self, root: str):
        self.root = root
        top = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))
        self.merged = bool(top)
        self.entries: dict[str, dict[str, TensorEntry]] = {}
        self.where: dict[str, str] = {}  # tensor name -> file (relative)
        self.method: str | None = None
        if self.merged:
            for file in top:
                self.entries[file] = read_header(os.path.join(root, file))
                for name in self.entries[file]:
                    self.where[name] = file
        else:
            self._index_raw()
        self._reader = SafetensorsReader(root, self.entries) if self.merged else None

    def _index_raw(self) -> None:
        methods = set()
        for dirpath, _, names in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root).split(os.sep)
            m_dir = [re.fullmatch(r"_layer_(\d+)", rel[0]) if rel else None,
                     re.fullmatch(r"_numa_(\d+)", rel[1]) if len(rel) == 2 else None]
            if len(rel) != 2 or not all(m_dir):
                continue
            layer, part = int(m_dir[0].group(1)), int(m_dir[1].group(1))  # type: ignore[union-attr]
            for name in names:
                m = _RAW.fullmatch(name)
                if not m:
                    continue
                methods.add(m.group(1))
                what = "weight" if m.group(5) == "quant" else "scale"
                self.where[tensor_name(layer, m.group(2), int(m.group(3)), part, what)] = os.path.join(*rel, name)
        if len(methods) > 1:
            raise ConversionError(f"{self.root}: both INT4 and INT8 .kt files")
        self.method = methods.pop().lower() if methods else None

    def layers(self) -> list[int]:
        found = {int(m.group(1)) for n in self.where for m in [re.fullmatch(r"blk\.(\d+)\.ffn_up_exps\.0\.numa\.0\.weight", n)] if m}
        return sorted(found)

    def probe(self, layer: int) -> tuple[int, int]:
        """(experts, parts) as kt-kernel's loader counts them."""
        experts = 0
        while f"blk.{layer}.ffn_up_exps.{experts}.numa.0.weight" in self.where:
            experts += 1
        parts = 0
        while f"blk.{layer}.ffn_up_exps.0.numa.{parts}.weight" in self.where:
            parts += 1
        return experts, parts

    def info(self, name: str) -> tuple[DType, int] | None:
        """(dtype, element count) of a stored tensor, None when missing."""
        file = self.where.get(name)
        if file is None:
            return None
        if self.merged:
            e = self.entries[file][name]
            count = 1
            for s in e.shape:
                count *= s
            return (e.dtype, count) if len(e.shape) == 1 else (e.dtype, -1)
        dtype = dtypes.FLOAT32 if name.endswith(".scale") else dtypes.INT8
        return dtype, os.path.getsize(os.path.join(self.root, file)) // dtype.itemsize

    def read(self, name: str) -> torch.Tensor:
        file = self.where[name]
        if self.merged:
            e = self.entries[file][name]
            assert self._reader is not None
            return tx.materialize(tx.source(TensorRef(file, name), e.dtype, e.shape), self._reader)
        dtype = np.float32 if name.endswith(".scale") else np.int8
        return torch.from_numpy(np.fromfile(os.path.join(self.root, file), dtype=dtype))


@dataclass
class Outcome:
    checked: int = 0  # projections decoded and compared
    problems: list[str] = field(default_factory=list)
    worst: float = 0.0  # largest error as a fraction of its bound

    def add(self, problem: str) -> None:
        self.problems.append(problem)


def verify(kt_dir: str, source: str, load_platform: str = "huggingface", converters: tuple[str, ...] = (),
           quant_method: str | None = None) -> tuple[Outcome, str]:
    if not os.path.isdir(kt_dir):
        raise ConversionError(f"verify-kt: {kt_dir} is not a directory")
    stored = Stored(kt_dir)
    layers = stored.layers()
    if not layers:
        raise ConversionError(f"verify-kt: {kt_dir} holds no blk.L.ffn_up_exps.0.numa.0.weight (neither top-level "
                              "safetensors nor _layer_L/_numa_p/*.kt files of kt-kernel)")
    probes = {layer: stored.probe(layer) for layer in layers}
    parts = probes[layers[0]][1]
    out = Outcome()
    for layer, (_, p) in probes.items():
        if p != parts:
            out.add(f"layer {layer}: {p} NUMA parts, layer {layers[0]} has {parts}")
    method = quant_method or stored.method or _method_from_sizes(stored, layers[0])
    plan = build_plan(PlanRequest(load_platform, "kt_cpu", source, TargetDir(os.path.join(kt_dir, ".verify"), dry_run=True),
                                  converters=converters, kt=KtRequest(method, parts)))
    target = plan.target
    assert isinstance(target, KtCpuTarget) and target.found is not None and target.shape is not None
    scheme = kt_amx.SCHEMES[method]
    want_layers = sorted(target.found.layers)
    if want_layers != layers:
        out.add(f"MoE layers {layers} in {kt_dir}, the source has {want_layers}")
    reader = plan.source.reader()
    try:
        for layer in want_layers:
            experts = probes.get(layer, (0, 0))[0]
            if layer in probes and experts != target.shape.num_experts:
                out.add(f"layer {layer}: kt-kernel's loader would count {experts} experts, the source has "
                        f"{target.shape.num_experts}")
            for expert in range(target.shape.num_experts):
                for proj in PROJECTIONS:
                    _check_projection(stored, target, reader, scheme, layer, expert, proj, parts, out)
    finally:
        reader.close()
    return out, method


def _method_from_sizes(stored: Stored, layer: int) -> str:
    """INT8 stores one byte per weight, INT4 half: told apart by the up projection's bytes per scale."""
    w, s = stored.info(f"blk.{layer}.ffn_up_exps.0.numa.0.weight"), stored.info(f"blk.{layer}.ffn_up_exps.0.numa.0.scale")
    d = stored.info(f"blk.{layer}.ffn_down_exps.0.numa.0.scale")
    if not (w and s and d) or s[1] <= 0 or d[1] <= 0:
        raise ConversionError("verify-kt: cannot tell INT4 from INT8 (pass --quant-method)")
    hidden, per_part = d[1], s[1]  # down's scales: one per hidden row; up's: one per part row
    return "int8" if w[1] == hidden * per_part else "int4"


def _check_projection(stored: Stored, target: KtCpuTarget, reader, scheme: kt_amx.AmxScheme, layer: int, expert: int,
                      proj: str, parts: int, out: Outcome) -> None:
    assert target.found is not None
    projection = target.found.layers[layer][(expert, proj)]
    decoded = []
    for index in range(parts):
        part = numa_part(projection, proj, index, parts)
        names = {what: tensor_name(layer, proj, expert, index, what) for what in ("weight", "scale")}
        want = {"weight": (dtypes.INT8, kt_amx.weight_bytes(part.n, part.k, scheme)), "scale": (dtypes.FLOAT32, part.n)}
        for what, name in names.items():
            got = stored.info(name)
            if got is None:
                where = (raw_file_name(scheme, layer, proj, expert, index, what, want[what][1] * want[what][0].itemsize)
                         if not stored.merged else name)
                out.add(f"{where}: missing")
                return
            if got != want[what]:
                out.add(f"{name}: {tx.dtype_name(got[0])} with {got[1]} elements, expected "
                        f"{tx.dtype_name(want[what][0])} with {want[what][1]} (a part count or method mismatch)")
                return
        scale = stored.read(names["scale"])
        decoded.append((kt_amx.decode(stored.read(names["weight"]), scale, part.n, part.k, scheme),
                        kt_amx.error_bound(scale, scheme)))
    values = torch.cat([d for d, _ in decoded], dim=1 if proj == "down" else 0)
    # The bound is per row of each part: gate/up rows are split across parts, down columns.
    bounds = (torch.cat([b[:, None].expand(d.shape) for d, b in decoded], dim=1) if proj == "down"
              else torch.cat([b for _, b in decoded])[:, None])
    source = tx.materialize(tx.cast(projection.expr, dtypes.BFLOAT16), reader).to(torch.float32)
    source = source.reshape(source.shape[-2:])
    if projection.transposed:
        source = source.t()
    err = (values - source).abs()
    ok = kt_amx.within_bound(err, source, bounds)
    ratio = float((err / bounds.clamp(min=1e-38)).max()) if err.numel() else 0.0
    out.worst = max(out.worst, ratio)
    out.checked += 1
    if not bool(ok.all()):
        bad = int((~ok).sum())
        out.add(f"layer {layer} expert {expert} {proj}: {bad} of {err.numel()} values beyond the {scheme.name} bound "
                f"(max error {float(err.max()):.3g}) against {projection.source}")


def main(argv: list[str]) -> int:
    p = one_line_parser("convert-checkpoint verify-kt", "Check a KTransformers CPU-expert directory against its source.")
    p.add_argument("kt_dir", help="output of convert-checkpoint kt or kt-kernel's convert_cpu_weights.py")
    p.add_argument("--source", required=True, help="the checkpoint it was converted from")
    p.add_argument("--load_platform", "--load-platform", choices=("huggingface", "mcore"), default="huggingface")
    p.add_argument("--converter", action="append", default=[], metavar="SPEC", help="pre-stage on an HF source")
    p.add_argument("--quant-method", "--quant_method", dest="quant_method", choices=("int4", "int8"),
                   help="default: told by the stored sizes or file names")
    ns = p.parse_args(argv)
    try:
        converters = tuple(ns.converter)
        if ns.load_platform == "huggingface" and not converters:
            from .kt_cmd import source_quant_method

            q = source_quant_method(ns.source)
            converters = ("dequantize",) if q is not None and q != "fp8" else ()
        outcome, method = verify(ns.kt_dir, ns.source, ns.load_platform, converters, ns.quant_method)
    except ConversionError as e:
        print(f"convert-checkpoint verify-kt: error: {e}", file=sys.stderr)
        return e.exit_code
    stored = Stored(ns.kt_dir)
    layers = stored.layers()
    experts, parts = stored.probe(layers[0])
    for problem in outcome.problems[:20]:
        print(f"MISMATCH: {problem}")
    if len(outcome.problems) > 20:
        print(f"... and {len(outcome.problems) - 20} more")
    print(f"{ns.kt_dir}: {method.upper()} ({'merged safetensors' if stored.merged else 'raw .kt files'}), "
          f"{len(layers)} MoE layers x {experts} experts x {parts} NUMA parts; {outcome.checked} projections "
          f"decoded, worst error {outcome.worst:.4f} of the bound")
    print(f"serve with: --kt-method AMX{method.upper()} --kt-threadpool-count {parts}")
    if outcome.problems:
        print(f"verify-kt: {len(outcome.problems)} problems")
        return 1
    print("verify-kt: OK")
    return 0
