"""GPT-OSS (gpt_oss): fused 3-D experts stored input-major with gate/up interleaved in their
columns, biases everywhere, attention sinks; the tensor_expr nodes that express that layout
(select/stack, transpose, strided/interleave), bit-exact HF -> MCore -> HF round trips, the
MXFP4 pre-stage and bad input."""
from __future__ import annotations

import pytest
import torch

from convert_checkpoint import tensor_expr as te


class DictReader:
    def __init__(self, tensors):
        self.tensors = tensors

    def read_into(self, leaf, out):
        t = self.tensors[leaf.ref.name]
        for dim, (o, s) in enumerate(zip(leaf.offsets, leaf.shape)):
            t = t.narrow(dim, o, s)
        out.copy_(t)


def _leaf(name, t):
    return te.source(te.TensorRef("f", name), t.dtype, t.shape)


def _every_window(expr, full, reader):
    """Every narrow of ``expr`` (each dim, start, length) materializes to that window of ``full``."""
    assert expr.shape == tuple(full.shape)
    assert torch.equal(te.materialize(expr, reader), full)
    for dim in range(full.dim()):
        for start in range(full.shape[dim]):
            for length in range(1, full.shape[dim] - start + 1):
                got = te.materialize(te.narrow(expr, dim, start, length), reader)
                assert torch.equal(got, full.narrow(dim, start, length)), (dim, start, length)


def test_select_stack_transpose_strided_interleave_narrow_exactly():
    x = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    reader = DictReader({"x": x})
    leaf = _leaf("x", x)
    _every_window(te.select(leaf, 0, 1), x[1], reader)
    _every_window(te.select(leaf, 2, 5), x[:, :, 5], reader)
    _every_window(te.transpose(te.select(leaf, 0, 2)), x[2].T, reader)
    _every_window(te.transpose(leaf, 0, 2), x.transpose(0, 2), reader)
    _every_window(te.strided(leaf, 2, 1, 2), x[:, :, 1::2], reader)
    _every_window(te.strided(leaf, 2, 0, 4), x[:, :, 0::4], reader)
    _every_window(te.strided(leaf, 1, 1, 2, 1), x[:, 1:2], reader)
    gate, up = te.strided(te.select(leaf, 0, 0), 1, 0, 2), te.strided(te.select(leaf, 0, 0), 1, 1, 2)
    fc1 = te.cat([te.transpose(gate), te.transpose(up)], 0)  # Megatron's [gate; up] rows
    _every_window(fc1, torch.cat([x[0][:, 0::2].T, x[0][:, 1::2].T]), reader)
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    r2 = DictReader({"a": a, "b": b})
    woven = torch.stack([a, b], 2).flatten(1)  # columns a0 b0 a1 b1 ...
    _every_window(te.interleave([_leaf("a", a), _leaf("b", b)], 1), woven, r2)
    _every_window(te.interleave([_leaf("a", a), _leaf("b", b)], 0), torch.stack([a, b], 1).flatten(0, 1), r2)
    _every_window(te.stack([_leaf("a", a), _leaf("b", b)], 1), torch.stack([a, b], 1), r2)
    _every_window(te.stack([te.transpose(_leaf("a", a)), te.transpose(_leaf("b", b))], 0), torch.stack([a.T, b.T]), r2)


def test_layout_nodes_invert_each_other():
    """Each node and its inverse give back the source values; select/stack and a strided cut of an
    interleave reduce to plain windows."""
    x = torch.randn(2, 4, 6)
    leaf = _leaf("x", x)
    experts = [te.select(leaf, 0, e) for e in range(2)]
    assert te.stack(experts, 0) == te.cat([te.narrow(leaf, 0, e, 1) for e in range(2)], 0)  # windows only
    assert te.transpose(te.transpose(experts[1])) == experts[1]
    strands = [te.strided(experts[0], 1, j, 2) for j in range(2)]
    assert torch.equal(te.materialize(te.interleave(strands, 1), DictReader({"x": x})), x[0])
    woven = te.interleave([_leaf("a", torch.zeros(3, 2)), _leaf("b", torch.zeros(3, 2))], 1)
    assert te.strided(woven, 1, 1, 2) == _leaf("b", torch.zeros(3, 2))
    assert te.describe(te.transpose(experts[1])) == "f:x[1:2,:,:].squeeze(0).T(0, 1)"


def test_layout_node_errors():
    leaf = _leaf("x", torch.zeros(4, 6))
    with pytest.raises(ValueError):
        te.strided(leaf, 1, 6, 2)
    with pytest.raises(ValueError):
        te.strided(leaf, 1, 1, 2, 4)
    with pytest.raises(ValueError):
        te.interleave([leaf, _leaf("y", torch.zeros(4, 5))], 1)
    with pytest.raises(ValueError):
        te.stack([leaf, _leaf("y", torch.zeros(4, 5))], 0)
