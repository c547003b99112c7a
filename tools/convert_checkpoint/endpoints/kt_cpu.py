"""KTransformers CPU experts (kt-kernel AMXINT4 / AMXINT8): a Target.

What kt-kernel 0.7's ``convert_cpu_weights.py`` writes, from any source this project reads:

* every routed expert's gate, up and down projection, its intermediate dimension split equally
  into ``--threadpool-count`` NUMA parts (gate/up by rows, down by columns), each part quantized
  and tiled by ``quant/kt_amx``: ``blk.L.ffn_{gate,up,down}_exps.E.numa.p.weight`` (int8 bytes)
  and ``.scale`` (fp32 per output row);
* merged (default): one safetensors shard per MoE layer in layer order, then one with every
  non-expert tensor as stored, renamed ``model.layers.`` -> ``blk.`` and ``model.`` dropped; the
  index (``total_size`` 0, as kt-kernel writes it); config.json and three tokenizer files copied;
* ``--no-merge-safetensor``: raw files ``_layer_L/_numa_p/INT4_gate_E_<bytes>Byte_quant_.kt`` and
  ``..._scale_.kt``, nothing else.

Experts of layers from ``num_hidden_layers`` on (MTP) are left out, as kt-kernel 0.7 does (a plan
note names them). Each output tensor is an ``Encode`` of a bf16 window of the source, so a worker
reads and holds one expert part at a time.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch

from .. import dtypes
from .. import tensor_expr as tx
from ..core.naming import natural_key
from ..core.plan import ModelInfo, OutputFile, Plan, TensorJob
from ..errors import ConversionError
from ..formats.safetensors_io import PlannedTensor, write_streaming
from ..quant import kt_amx
from ..requests import KtRequest, PlanRequest
from ..tensor_expr import Expr
from .base import HFSource, HFTarget, Source
from .kt_experts import PROJECTIONS, ExpertLayers, MoeShape, Projection, expert_dtype, find_experts, moe_shape, output_name

if TYPE_CHECKING:
    from ..materialize import FileContext
    from ..report import FileResult

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # what kt-kernel copies
MERGED_KIND = "kt-safetensors"
RAW_KIND = "kt-raw"
# Bytes a worker holds per element of the expert part it encodes: the bf16 window, its fp32
# copy, the int8 codes, the packed and the tiled bytes (FP8 sources add an fp32 dequantization).
_BYTES_PER_ELEMENT = 12


@dataclass(frozen=True)
class KtCodec:
    """How a part becomes an output tensor: ``what`` is weight or scale; ``transpose``: the part
    is stored as [in, out] of the matrix to encode."""

    method: str  # int4 | int8
    what: str
    transpose: bool
    ieee: bool = False

    def __str__(self) -> str:
        return f"amx-{self.method}-{self.what}{'-T' if self.transpose else ''}{'-ieee' if self.ieee else ''}"


def tensor_name(layer: int, proj: str, expert: int, part: int, what: str) -> str:
    return f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{part}.{what}"


def raw_file_name(scheme: kt_amx.AmxScheme, layer: int, proj: str, expert: int, part: int, what: str,
                  nbytes: int) -> str:
    kind = "quant" if what == "weight" else "scale"
    return f"_layer_{layer}/_numa_{part}/{scheme.name}_{proj}_{expert}_{nbytes}Byte_{kind}_.kt"


@dataclass(frozen=True)
class Part:
    """One NUMA part of one projection: the window and the matrix it encodes ([n, k])."""

    window: Expr  # bf16, stored orientation
    transposed: bool  # window is [k, n] of the matrix to encode
    n: int
    k: int


def numa_part(p: Projection, proj: str, index: int, count: int) -> Part:
    """Part ``index`` of ``count``: gate/up rows, down columns of the HF [out, in] matrix."""
    hf_dim = 1 if proj == "down" else 0  # the intermediate dimension
    dim = p.hf_dim(hf_dim)
    size = p.expr.shape[dim] // count
    window = tx.cast(tx.narrow(p.expr, dim, index * size, size), dtypes.BFLOAT16)
    rows, cols = tuple(window.shape[-2:])
    n, k = (cols, rows) if p.transposed else (rows, cols)
    return Part(window, p.transposed, n, k)


class KtCpuTarget(HFTarget):
    format = "kt_cpu"
    short = "kt"
    file_kind = MERGED_KIND
    markers = (INDEX_NAME, *COPIED)
    needs_converter = False  # the experts are transformed here; an HF source is taken as it is

    def __init__(self, target_dir: str, request: KtRequest):
        super().__init__(target_dir)
        if request.quant_method not in kt_amx.SCHEMES:
            raise ConversionError(f"--quant-method {request.quant_method}: only int4 and int8 (AMXINT4/AMXINT8) are "
                                  "written; moe_int4/moe_int8 (kt-kernel's generic backend) use another layout")
        if request.parts < 1:
            raise ConversionError(f"--threadpool-count {request.parts}: must be at least 1")
        self.request = request
        self.scheme = kt_amx.SCHEMES[request.quant_method]
        self.config: dict | None = None
        self.copy_from: str | None = None
        self.post_stage_config = None
        self.notes: list[str] = []
        self.shape: MoeShape | None = None
        self.found: ExpertLayers | None = None  # the source's experts, as planned (verify-kt reads them)
        self.memory: dict[str, int] = {}  # relpath -> bytes a worker holds to write it

    # --- planning ------------------------------------------------------------------------

    def use_model_config(self, model: ModelInfo) -> None:
        self.config = dict(model.hf_config) if model.hf_config else model.family.config_from_arch(model.arch)

    def plan_files_like(self, source: HFSource, notes: list[str]) -> list[OutputFile]:
        """An HF source (after any --converter): experts as the source pairs them (FP8 with
        their scales), every other tensor exactly as stored."""
        raw = {name: expr for items in source.native().values() for name, expr in items}
        self.config = source.hf_config
        self.copy_from = source.root
        files = self._plan(list(raw), lambda name: source.leaf(name), raw)
        notes += self.notes
        return files

    def plan_files(self, exprs: Mapping[str, Expr], fp8_names: set[str]) -> list[OutputFile]:
        """Through the model mapping (a Megatron source): the HF tensors it produces."""
        files = self._plan(sorted(exprs, key=natural_key), lambda name: exprs[name], exprs)
        return files

    def plan_shards(self, shards: Mapping[str, list[tuple[str, Expr]]], notes: list[str]) -> list[OutputFile]:
        raise ConversionError("--converter after a Megatron source is not supported for the kt_cpu target; "
                              "convert to HF first, or give the converters on an HF source")

    def _plan(self, names: list[str], expert_expr: Callable[[str], Expr], stored: Mapping[str, Expr]) -> list[OutputFile]:
        shape = moe_shape(self.config or {})
        self.shape = shape
        found = find_experts(names, expert_expr, shape)
        self.found = found
        if not found.layers:
            raise ConversionError("no routed experts found (mlp.experts.N.{gate,up,down}_proj, fused "
                                  "mlp.experts.gate_up_proj/down_proj, or block_sparse_moe.experts.N.w1/w2/w3)")
        self._check_input_type(found)
        self._check_sizes(shape)
        if found.dropped_mtp:
            self.notes.append(f"{len(found.dropped_mtp)} routed-expert tensors of layers >= num_hidden_layers "
                              f"{shape.num_layers} (MTP) are left out, as kt-kernel 0.7 does (e.g. {found.dropped_mtp[0]})")
        files = self._plan_merged(found, stored) if self.request.merge else self._plan_raw(found)
        self.notes.append(f"KTransformers {self.scheme.name}: {len(found.layers)} MoE layers x {shape.num_experts} "
                          f"experts, {self.request.parts} NUMA parts (serve with --kt-threadpool-count "
                          f"{self.request.parts}); {'merged safetensors' if self.request.merge else 'raw .kt files'}")
        return files

    def _check_input_type(self, found: ExpertLayers) -> None:
        kinds = {expert_dtype(p.expr) for slot in found.layers.values() for p in slot.values()}
        given = self.request.input_type
        if given in (None, "awq"):  # awq: dequantized by the pre-stage, so bf16 here
            return
        if kinds != {given}:
            raise ConversionError(f"--input-type {given}: the routed experts are {', '.join(sorted(kinds))}")

    def _check_sizes(self, shape: MoeShape) -> None:
        parts, s = self.request.parts, self.scheme
        if shape.intermediate % parts:
            raise ConversionError(f"--threadpool-count {parts}: the expert intermediate size {shape.intermediate} "
                                  "is not divisible by it")
        part = shape.intermediate // parts
        if part % s.k_multiple:
            if parts > 1:
                hint = " (try fewer parts, or --quant-method int8)" if s.bits == 4 and part % 64 == 0 else " (try fewer parts)"
            else:  # nothing to split further: the model itself does not fit the kernel's tiles
                hint = " (--quant-method int8 needs a multiple of 64)" if s.bits == 4 and part % 64 == 0 else ""
            raise ConversionError(f"--threadpool-count {parts}: each part holds {part} of the expert intermediate size "
                                  f"{shape.intermediate}, not a multiple of {s.k_multiple} as {s.name} needs{hint}")
        if shape.hidden % s.k_multiple:
            raise ConversionError(f"hidden_size {shape.hidden} is not a multiple of {s.k_multiple}, as "
                                  f"--quant-method {self.request.quant_method} needs")

    def _encoded(self, part: Part, layer: int, proj: str, expert: int, index: int) -> list[tuple[str, TensorJob]]:
        """(what, job) for the weight bytes and the scales of one part."""
        out = []
        for what, dtype, size in (("weight", dtypes.INT8, kt_amx.weight_bytes(part.n, part.k, self.scheme)),
                                  ("scale", dtypes.FLOAT32, part.n)):
            codec = KtCodec(self.request.quant_method, what, part.transposed, self.request.ieee_scales)
            job = TensorJob(tensor_name(layer, proj, expert, index, what),
                            tx.Encode(part.window, codec, (size,), dtype))
            out.append((what, job))
        return out

    def _parts(self, found: ExpertLayers, layer: int) -> Iterator[tuple[str, int, int, Part]]:
        """Every (projection, expert, part index, Part) of a layer, in output order."""
        shape = self.shape
        assert shape is not None
        slot = found.layers[layer]
        for index in range(self.request.parts):
            for expert in range(shape.num_experts):
                for proj in PROJECTIONS:
                    yield proj, expert, index, numa_part(slot[(expert, proj)], proj, index, self.request.parts)

    def _plan_merged(self, found: ExpertLayers, stored: Mapping[str, Expr]) -> list[OutputFile]:
        groups: list[tuple[list[TensorJob], int]] = []
        for layer in sorted(found.layers):
            jobs: list[TensorJob] = []
            largest = 0
            for proj, expert, index, part in self._parts(found, layer):
                jobs += [job for _, job in self._encoded(part, layer, proj, expert, index)]
                largest = max(largest, part.n * part.k)
            groups.append((jobs, largest * _BYTES_PER_ELEMENT))
        others = [job for name in found.others for job in _copy_jobs(output_name(name), stored[found.renamed[name]])]
        if others:
            groups.append((others, max(tx.nbytes(j.expr) for j in others if j.expr is not None)))
        seen: dict[str, str] = {}
        for job in others:
            if job.name in seen:
                raise ConversionError(f"tensors {seen[job.name]} and {job.name} get the same name in kt-kernel's "
                                      "renaming (model.layers. -> blk., model. removed)")
            seen[job.name] = job.name
        count = len(groups)
        files = []
        for i, (jobs, memory) in enumerate(groups):
            relpath = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            self.memory[relpath] = memory
            files.append(OutputFile(relpath, MERGED_KIND, (("", tuple(jobs)),)))
        return files

    def _plan_raw(self, found: ExpertLayers) -> list[OutputFile]:
        files = []
        for layer in sorted(found.layers):
            for proj, expert, index, part in self._parts(found, layer):
                for what, job in self._encoded(part, layer, proj, expert, index):
                    assert job.expr is not None
                    relpath = raw_file_name(self.scheme, layer, proj, expert, index, what, tx.nbytes(job.expr))
                    self.memory[relpath] = part.n * part.k * _BYTES_PER_ELEMENT
                    files.append(OutputFile(relpath, RAW_KIND, (("", (job,)),)))
        return files

    def check_plan(self, plan: Plan) -> None:
        if plan.fp8 is not None:  # FP8 non-expert tensors are copied as stored, never requantized
            for name, expr in plan.fp8_jobs():
                if isinstance(expr, tx.Quantize):
                    raise ConversionError(f"{name}: would be requantized to FP8; the kt_cpu target copies FP8 "
                                          "tensors only as stored")

    def memory_bytes(self, out: OutputFile, source: Source) -> int:
        return self.memory.get(out.relpath, out.nbytes)

    def fingerprint_fields(self) -> dict:
        return {"args": None, "hf_config": self.config, "kt": repr(self.request)}

    # --- writing -------------------------------------------------------------------------

    def write_file(self, out: OutputFile, path: str, ctx: FileContext) -> None:
        (_, jobs), = out.containers
        encoder = _PartEncoder(ctx, self.scheme)
        if out.fmt == RAW_KIND:
            (job,) = jobs
            assert job.expr is not None
            value = encoder.value(job.name, job.expr)
            with open(path, "wb") as f:
                f.write(value.contiguous().view(torch.uint8).numpy().data)
            return
        by_name = {j.name: j.expr for j in jobs if j.expr is not None}
        planned = [PlannedTensor(j.name, j.expr.dtype, tuple(j.expr.shape)) for j in jobs if j.expr is not None]
        write_streaming(path, planned, lambda t: encoder.value(t.name, by_name[t.name]))  # no __metadata__, as kt-kernel

    def finish(self, plan: Plan, results: list[FileResult]) -> None:
        from ..textfile import write_text

        if not self.request.merge:  # kt-kernel's no-merge mode writes the .kt files only
            return
        weight_map = {j.name: f.relpath for f, _, j in plan.jobs()}
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        write_text(os.path.join(self.target_dir, INDEX_NAME), json.dumps(index, indent=2))
        copied = set()
        if self.copy_from:
            for name in COPIED:
                src = os.path.join(self.copy_from, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(self.target_dir, name))
                    copied.add(name)
        if CONFIG_NAME not in copied and self.config is not None:  # a Megatron source: the model's config.json
            write_text(os.path.join(self.target_dir, CONFIG_NAME), json.dumps(self.config, indent=2, sort_keys=True) + "\n")


def _copy_jobs(name: str, expr: Expr) -> list[TensorJob]:
    """A non-expert tensor as stored; block FP8 from a Megatron source as HF stores it, codes and
    ``weight_scale_inv`` (what kt-kernel copies from an HF FP8 checkpoint)."""
    if isinstance(expr, (tx.Fp8Blocks, tx.Quantize)):
        return [TensorJob(name, tx.fp8_part(expr, "codes")), TensorJob(f"{name}_scale_inv", tx.fp8_part(expr, "scale"))]
    return [TensorJob(name, expr)]


class _PartEncoder:
    """Encodes each part once for its weight and its scale (adjacent in the plan)."""

    def __init__(self, ctx: FileContext, scheme: kt_amx.AmxScheme):
        self.ctx = ctx
        self.scheme = scheme
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def value(self, name: str, expr: Expr) -> torch.Tensor:
        if not isinstance(expr, tx.Encode) or not isinstance(expr.codec, KtCodec):  # a copied tensor
            return self.ctx.value(name, expr)
        codec = expr.codec
        key = (expr.part, codec.transpose, codec.ieee)
        if key != self._key:
            self._key, self._value = None, None
            matrix = self.ctx.value(name, expr.part)
            matrix = matrix.reshape(matrix.shape[-2:])
            if codec.transpose:
                matrix = matrix.t()
            if codec.what == "scale":  # a scale asked first (a raw .kt scale file): the row maxima suffice
                return kt_amx.row_scales(kt_amx.row_amax(matrix.to(torch.float32)), self.scheme, codec.ieee)
            self._value = kt_amx.encode(matrix, self.scheme, codec.ieee)
            self._key = key
        assert self._value is not None
        return self._value[0] if codec.what == "weight" else self._value[1]


def create_target(request: PlanRequest) -> KtCpuTarget:
    return KtCpuTarget(request.target.path, request.kt)
