"""Print, as JSON, the state-dict keys and shapes of megatron-core's DSA indexer (DSAIndexer) for
the sizes given on the command line. Run in a subprocess by tests/test_new_families.py.

megatron-core 0.16's DSA spec takes the indexer's linears from ``backend.linear()``, which only
its Transformer Engine provider has, and passes them TE's ``parallel_mode="duplicated"``. Without
Transformer Engine (this CPU machine) the indexer is built here with a minimal stand-in linear
(a ``weight`` of [out, in], the shape TE's Linear gives it) and megatron's own LayerNorm for
``k_norm``: attribute names, norm kind and shapes are megatron-core's."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch


class _Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, *, config, init_method, bias, skip_bias_add,
                 skip_weight_param_allocation, parallel_mode):
        super().__init__()
        assert parallel_mode == "duplicated" and not bias, (parallel_mode, bias)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))


def main(hidden: int, q_lora: int, heads: int, head_dim: int, rope: int) -> dict:
    torch.cuda.current_device = lambda: torch.device("cpu")  # RotaryEmbedding's inv_freq device (CPU run)
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexer, DSAIndexerSubmodules
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    config = MLATransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=heads, q_lora_rank=q_lora, kv_lora_rank=16,
        qk_head_dim=16, qk_pos_emb_head_dim=rope, v_head_dim=16, experimental_attention_variant="dsa",
        dsa_indexer_n_heads=heads, dsa_indexer_head_dim=head_dim, dsa_indexer_topk=4, rope_type="rope",
        normalization="RMSNorm", use_cpu_initialization=True)
    submodules = DSAIndexerSubmodules(linear_wq_b=_Linear, linear_wk=_Linear, k_norm=WrappedTorchNorm,
                                      linear_weights_proj=_Linear)
    indexer = DSAIndexer(config, submodules, pg_collection=SimpleNamespace(tp=None, cp=None))
    return {k: list(v.shape) for k, v in indexer.state_dict().items()}


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:]))))
