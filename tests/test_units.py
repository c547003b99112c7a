"""Pure units: tensor expressions, pipeline splits, vocab padding, TP shard/unshard."""
from __future__ import annotations

import pytest
import torch

from convert_checkpoint import dtypes
from convert_checkpoint import tensor_expr as te
from convert_checkpoint.errors import ConversionError
from convert_checkpoint.layout.pipeline import balanced_split, build_pipeline_layout
from convert_checkpoint.layout.tensor_parallel import Split, padded_vocab_size, shard, unshard
from helpers import DictReader, expr_leaf

_leaf = expr_leaf


def test_narrow_pushes_through_cat_and_repeat():
    a, b = torch.arange(12.).reshape(3, 4), torch.arange(100., 108.).reshape(2, 4)
    reader = DictReader({"a": a, "b": b})
    expr = te.cat([_leaf("a", a), _leaf("b", b), te.repeat(te.narrow(_leaf("b", b), 0, 1, 1), 0, 2)], 0)
    full = torch.cat([a, b, b[1:].expand(2, 4)])
    assert torch.equal(te.materialize(expr, reader), full)
    for dim in (0, 1):
        for start in range(full.shape[dim]):
            for length in range(1, full.shape[dim] - start + 1):
                got = te.materialize(te.narrow(expr, dim, start, length), reader)
                assert torch.equal(got, full.narrow(dim, start, length)), (dim, start, length)


def test_cast_converts_on_read_and_narrows_through():
    a = torch.randn(4, 6).to(torch.bfloat16)
    reader = DictReader({"a": a})
    expr = te.cast(_leaf("a", a), torch.float32)
    assert expr.dtype == dtypes.FLOAT32 and te.nbytes(expr) == 4 * 6 * 4
    assert te.cast(expr, torch.bfloat16) == _leaf("a", a)  # casting back is the source itself
    part = te.narrow(expr, 1, 2, 3)
    assert isinstance(part, te.Cast) and part.part.offsets == (0, 2)  # the window reaches the leaf
    assert torch.equal(te.materialize(part, reader), a[:, 2:5].float())
    assert te.describe(part) == "float32(f:a[:,2:5])"


@pytest.mark.parametrize("split", list(Split))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_unshard_inverse(split, tp):
    t = torch.randn(16, 8)
    reader = DictReader({"t": t})
    expr = _leaf("t", t)
    padded = 20 if split is Split.VOCAB else None
    shards = [shard(expr, split, tp, r, padded) for r in range(tp)]
    back = unshard(shards, split, rows=16)
    assert torch.equal(te.materialize(back, reader), t)
    if split is Split.GATED_COLUMN:
        gate, up = t[:8], t[8:]
        n = 8 // tp
        assert torch.equal(te.materialize(shards[-1], reader), torch.cat([gate[-n:], up[-n:]]))


def test_padded_vocab_is_megatrons_rule():
    assert padded_vocab_size(250, 128, 1) == 256
    assert padded_vocab_size(250, 128, 4) == 512
    assert padded_vocab_size(151936, 128, 8) == 152576  # 149 x 1024
    assert padded_vocab_size(256, 128, 2) == 256


def test_pipeline_splits():
    assert balanced_split(61, 8) == (8, 8, 8, 8, 8, 7, 7, 7)
    assert balanced_split(4, 3) == (2, 1, 1)
    layout = build_pipeline_layout(6, 2, 2, (2, 1, 1, 2))
    # virtual stage s*pp + p: rank0 chunk0, rank1 chunk0, rank0 chunk1, rank1 chunk1
    assert [layout.locate(i) for i in range(6)] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0), (1, 1, 0), (1, 1, 1)]
    with pytest.raises(ConversionError, match="needs --pipeline_model_parallel_size > 1"):
        build_pipeline_layout(4, 1, 2, None)
    with pytest.raises(ConversionError, match="num_layers_per_virtual_pipeline_stage"):
        build_pipeline_layout(8, 2, 2, None, layers_per_vstage_flag=3)
    # The alternative VPP spec implies the number of virtual stages.
    implied = build_pipeline_layout(8, 2, None, None, layers_per_vstage_flag=2)
    assert (implied.vpp, implied.layers_per_vstage) == (2, (2, 2, 2, 2))
    with pytest.raises(ConversionError, match="does not divide 8 layers"):
        build_pipeline_layout(8, 2, None, None, layers_per_vstage_flag=3)
