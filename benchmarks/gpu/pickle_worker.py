#!/usr/bin/env python
"""Read FP8 rank files in a fresh process, for benchmarks/fp8_gpu_check.py.

    pickle_worker.py ours FILE...   te_pickle.load in a process where TE is NOT importable
                                    (TE registers its own classes as torch safe globals under the
                                    same names as te_pickle's stand-ins; this run has none of that)
    pickle_worker.py te FILE...     TE only (no convert_checkpoint import): torch.load of each
                                    file with weights_only=False and =True, as a Megatron process
                                    with TE would read it

Prints one JSON object: {"te_importable": ..., "files": {FILE: {...}}} with sha256 digests of
the codes / scales / dequantized values so the caller can compare bytes without shipping them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys

import torch


def sha(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def read_ours(paths: list[str]) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))
    from convert_checkpoint.quant import te_pickle

    out = {}
    for p in paths:
        try:
            rec = te_pickle.load(p)["model"]["w"]
            out[p] = {"type": type(rec).__name__, "shape": list(rec.shape), "pow2": rec.pow2,
                      "amax_epsilon": rec.amax_epsilon, "dtype": str(rec.codes.dtype),
                      "codes_sha": sha(rec.codes), "scale_sha": sha(rec.scale_inv.float()),
                      "padded_scale_shape": list(rec.rowwise_scale_inv.shape)}
        except Exception as e:  # noqa: BLE001
            out[p] = {"error": f"{type(e).__name__}: {e}"}
    return out


def read_te(paths: list[str]) -> dict:
    import transformer_engine.pytorch  # noqa: F401  (registers TE's safe globals)

    out = {}
    for p in paths:
        r = {}
        for wo in (False, True):
            key = f"weights_only={wo}"
            try:
                obj = torch.load(p, map_location="cpu", weights_only=wo)["model"]["w"]
                q = getattr(obj, "_quantizer", None)
                r[key] = {"type": type(obj).__name__,
                          "deq_sha": sha(obj.dequantize(dtype=torch.float32)),
                          "pow2": getattr(q, "force_pow_2_scales", None),
                          "amax_epsilon": getattr(q, "amax_epsilon", None)}
            except Exception as e:  # noqa: BLE001
                r[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        out[p] = r
    return out


def main() -> None:
    mode, paths = sys.argv[1], sys.argv[2:]
    te_importable = importlib.util.find_spec("transformer_engine") is not None
    files = read_ours(paths) if mode == "ours" else read_te(paths)
    print(json.dumps({"mode": mode, "te_importable": te_importable,
                      "te_imported": "transformer_engine" in sys.modules, "files": files}))


if __name__ == "__main__":
    main()
