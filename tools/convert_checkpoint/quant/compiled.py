"""Elementwise quantizers compiled into one fused GPU kernel, with eager torch's numerics.

Inductor's fp32 division is approximate by default (an ulp off, which moves quantized codes), so
a function is compiled only where Inductor offers IEEE-rounded division; otherwise, or if
compiling fails, the eager function runs: the same bytes, slower.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def exact_division_options() -> dict | None:
    """Inductor's options for eager numerics: IEEE-rounded fp32 division (``emulate_divison_rounding``
    in torch 2.10/2.11, ``eager_numerics.division_rounding`` later) and, where offered, the bf16/fp16
    rounding of every intermediate that eager torch rounds (``emulate_precision_casts``); None when
    there is no exact division."""
    try:
        import torch._inductor.config as cfg
    except ImportError:
        return None
    if hasattr(cfg, "emulate_divison_rounding"):
        options = {"emulate_divison_rounding": True}
    elif hasattr(getattr(cfg, "eager_numerics", None), "division_rounding"):
        options = {"eager_numerics.division_rounding": True}
    else:
        return None
    if hasattr(cfg, "emulate_precision_casts"):
        options["emulate_precision_casts"] = True
    return options


class CompiledOrEager:
    """``fn`` compiled on first use (one graph per input shape), falling back to ``fn`` itself
    for good when Inductor is unavailable or fails."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._eager_only = False

    def __call__(self, *args: Any) -> Any:
        if self._eager_only:
            return self.fn(*args)
        if self._compiled is None:
            options = exact_division_options()
            if options is None:
                self._eager_only = True
                return self.fn(*args)
            import torch
            from torch import _dynamo  # (a plain `import torch._dynamo` would make torch local here)

            for knob in ("recompile_limit", "cache_size_limit"):  # one graph per weight shape
                if hasattr(_dynamo.config, knob):
                    setattr(_dynamo.config, knob, max(getattr(_dynamo.config, knob), 64))
            self._compiled = torch.compile(self.fn, dynamic=False, fullgraph=True, options=options)
        try:
            return self._compiled(*args)
        except Exception:  # noqa: BLE001  (an Inductor/Triton failure: the eager form, same bytes)
            self._eager_only = True
            return self.fn(*args)
