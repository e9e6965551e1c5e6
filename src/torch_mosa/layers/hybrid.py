"""Hybrid attention: dense causal heads + optional sliding-window heads + sparse heads, summed (SPEC §2)."""

from __future__ import annotations

import torch
from torch import nn

from torch_mosa.flops import isoflop_num_heads
from torch_mosa.checks import check_attention_input, check_positive_int, check_routing
from torch_mosa.layers.dense import DenseAttention
from torch_mosa.layers.fixed import FixedSparseAttention
from torch_mosa.layers.local import LocalAttention
from torch_mosa.layers.mosa import MoSAAttention
from torch_mosa.layers.routing import RoutingAttention
from torch_mosa.ops.decode import layer_decode, layer_decode_suits
from torch_mosa.ops.dispatch import use_fast_path

SPARSE_KINDS = ("mosa", "fixed", "routing")


class HybridAttention(nn.Module):
    """Sum of `num_dense_heads` dense heads, `num_local_heads` local heads (window) and `num_mosa_heads` sparse heads.

    The sparse heads are MoSA heads unless `sparse_kind` picks the fixed or routing baseline (fixed heads with
    `per_head_offsets` stride from offset e mod sparsity, see layers/fixed.py). With
    `num_mosa_heads=None` their count is IsoFLOP-matched (SPEC §3) to a dense layer of `num_heads` heads at
    `seq_len`. Submodules: `dense`, `local`, `sparse` (each None when it has no heads).
    forward(x [B, T, h], attention_mask [B, T] or None, routing="topk"|"causal") -> [B, T, h].
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int = 64,
        num_mosa_heads: int | None = None,
        num_dense_heads: int = 4,
        num_local_heads: int = 0,
        window: int | None = None,
        sparsity: int | None = None,
        k: int | None = None,
        include_first: bool = False,
        num_heads: int | None = None,
        seq_len: int | None = None,
        sparse_kind: str = "mosa",
        per_head_offsets: bool = False,
        rotate_fraction: float = 0.5,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        if sparse_kind not in SPARSE_KINDS:
            raise ValueError(f"sparse_kind must be one of {SPARSE_KINDS}, got {sparse_kind!r}")
        if seq_len is not None:
            check_positive_int("seq_len", seq_len)
        if num_mosa_heads is None:
            if num_heads is None or seq_len is None or sparsity is None:
                raise ValueError("num_mosa_heads=None (IsoFLOP matching) needs num_heads, seq_len and sparsity; got "
                                 f"num_heads={num_heads}, seq_len={seq_len}, sparsity={sparsity}")
            num_mosa_heads = isoflop_num_heads(hidden_size, head_dim, num_heads, seq_len, sparsity,
                                               keep_dense_heads=num_dense_heads, kind=sparse_kind)
        for name, value in (("num_mosa_heads", num_mosa_heads), ("num_dense_heads", num_dense_heads),
                            ("num_local_heads", num_local_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if num_mosa_heads + num_dense_heads + num_local_heads == 0:
            raise ValueError("HybridAttention needs at least one head")
        if num_local_heads and window is None:
            raise ValueError("num_local_heads > 0 needs a window")
        self.hidden_size = hidden_size
        rope = dict(rotate_fraction=rotate_fraction, rope_base=rope_base)
        self.dense = DenseAttention(hidden_size, num_dense_heads, head_dim, **rope) if num_dense_heads else None
        self.local = LocalAttention(hidden_size, num_local_heads, head_dim, window, **rope) if num_local_heads else None
        self.sparse = None
        if num_mosa_heads and sparse_kind == "mosa":
            self.sparse = MoSAAttention(hidden_size, num_mosa_heads, head_dim, sparsity=sparsity, k=k,
                                        include_first=include_first, **rope)
        elif num_mosa_heads and sparse_kind == "fixed":
            self.sparse = FixedSparseAttention(hidden_size, num_mosa_heads, head_dim, sparsity,
                                               per_head_offsets=per_head_offsets, **rope)
        elif num_mosa_heads:
            self.sparse = RoutingAttention(hidden_size, num_mosa_heads, head_dim, sparsity, **rope)

    def parts(self) -> list[nn.Module]:
        return [m for m in (self.dense, self.local, self.sparse) if m is not None]

    def forward(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", documents=None) -> torch.Tensor:
        """`documents`: a DocumentLayout of packed documents (ops/documents.py), which every part keeps apart."""
        first = self.parts()[0]
        check_attention_input(x, self.hidden_size, next(first.parameters()), attention_mask, documents)
        check_routing(routing)
        return _summed(part(x, attention_mask, routing, documents=documents) for part in self.parts())

    # ---- causal inference: each part owns its cache, prefill and decode step ----

    def new_cache(self, batch: int, max_len: int, dtype, device):
        """LayerCache with the `dense`, `local` and `sparse` parts' caches (None where a part is absent)."""
        from torch_mosa.inference.cache import LayerCache

        return LayerCache(*(None if part is None else part.new_cache(batch, max_len, dtype, device)
                            for part in (self.dense, self.local, self.sparse)))

    def prefill(self, x: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
        return _summed(part.prefill(x, attention_mask, part_cache) for part, part_cache in zip(self.parts(), cache.parts()))

    def decode_step(self, x: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """x [B, 1, h] at `position` -> [B, 1, h]. Dense + MoSA layers on the GPU take one fused step for both parts
        (ops.decode.layer_decode: two kernel launches after the dense W_QKV GEMM) where it suits the layer and the
        batch (`layer_decode_suits`); otherwise, and on the CPU, each part steps on its own and the outputs are
        summed."""
        if self.local is None and isinstance(self.sparse, MoSAAttention) and use_fast_path(x) and \
                layer_decode_suits(x.shape[0], self.sparse.num_heads, self.sparse.heads_per_token):
            hx, mosa = self.sparse.decode_inputs(x, cache.sparse)
            dense = None if self.dense is None else self.dense.decode_inputs(x, cache.dense)
            return layer_decode(hx, position, dense, mosa, rotary_dim=self.sparse.rotary_dim,
                                rope_base=self.sparse.rope_base).unsqueeze(1)
        return _summed(part.decode_step(x, position, part_cache) for part, part_cache in zip(self.parts(), cache.parts()))


def _summed(outputs) -> torch.Tensor:
    """Sum without the `0 +` that sum() starts with (one kernel less per layer and decode step)."""
    outputs = iter(outputs)
    total = next(outputs)
    for out in outputs:
        total = total + out
    return total
