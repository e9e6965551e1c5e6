"""Routing attention baseline (Routing Transformer, Roy et al. 2021), as SPEC §2 describes it.

Each head has a shared query/key projection followed by a layer norm and `num_clusters` = sparsity centroids that
follow the normalised query/keys by an exponential moving average (online k-means). Every cluster takes the k tokens
most similar to its centroid and runs causal attention among them by original position; a token in several clusters
sums their outputs, a token in none gets 0.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from torch_mosa.checks import check_attention_input, check_positive_int, check_routing, selection_size
from torch_mosa.ops.selection.reference import sort_selection
from torch_mosa.ops.rope import apply_rope, rotary_dim_for


class RoutingAttention(nn.Module):
    """forward(x [B, T, h], attention_mask [B, T] or None) -> [B, T, h].

    Parameters w_qk [E, h, d], w_v [E, h, d], w_o [E, d, h]; buffer centroids [E, sparsity, d] (unit vectors).
    Centroids move only in training mode, after the output is computed, with decay `centroid_decay`.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, sparsity: int = 8,
                 centroid_decay: float = 0.999, rotate_fraction: float = 0.5, rope_base: float = 10000.0):
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_heads", num_heads)
        check_positive_int("head_dim", head_dim)
        check_positive_int("sparsity", sparsity)
        if not 0.0 <= centroid_decay < 1.0:
            raise ValueError(f"centroid_decay must be in [0, 1), got {centroid_decay}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.sparsity, self.num_clusters, self.centroid_decay = sparsity, sparsity, centroid_decay
        self.rotary_dim = rotary_dim_for(head_dim, rotate_fraction)
        self.rope_base = rope_base
        self.w_qk = nn.Parameter(torch.empty(num_heads, hidden_size, head_dim))
        self.w_v = nn.Parameter(torch.empty(num_heads, hidden_size, head_dim))
        self.w_o = nn.Parameter(torch.empty(num_heads, head_dim, hidden_size))
        self.register_buffer("centroids", torch.empty(num_heads, sparsity, head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(3 * self.head_dim)
        nn.init.uniform_(self.w_qk, -bound, bound)
        nn.init.uniform_(self.w_v, -bound, bound)
        bound_o = 1.0 / math.sqrt(self.hidden_size * self.num_heads)
        nn.init.uniform_(self.w_o, -bound_o, bound_o)
        with torch.no_grad():
            self.centroids.copy_(F.normalize(torch.randn_like(self.centroids), dim=-1))

    def forward(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", documents=None) -> torch.Tensor:
        check_attention_input(x, self.hidden_size, self.w_qk, attention_mask)
        if documents is not None:
            raise ValueError("RoutingAttention does not take packed documents: its clusters span the whole row; "
                             "train it on unpacked windows (no document_ids) or pick attention 'mosa', 'fixed', "
                             "'local' or 'dense'")
        if check_routing(routing) == "causal":
            raise ValueError("RoutingAttention has no causal mode: its clusters take top-k over the whole sequence; "
                             "use routing='topk'")
        batch, seq_len, hidden = x.shape
        k = selection_size(seq_len, self.sparsity, None)
        w_qk, w_v, w_o = self.w_qk, self.w_v, self.w_o
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_qk, w_v, w_o = x.to(dtype), w_qk.to(dtype), w_v.to(dtype), w_o.to(dtype)
        qk = F.layer_norm(torch.einsum("bth,ehd->betd", x, w_qk), (self.head_dim,))  # [B, E, T, d]
        v = torch.einsum("bth,ehd->betd", x, w_v)
        unit = F.normalize(qk.detach().float(), dim=-1)
        similarity = torch.einsum("betd,ecd->bect", unit, self.centroids.float())  # [B, E, C, T]
        if attention_mask is not None:
            similarity = similarity.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        indices = similarity.topk(k, dim=-1).indices  # [B, E, C, k]
        if attention_mask is None:
            valid = torch.ones_like(indices, dtype=torch.bool)
        else:
            valid = attention_mask.bool()[:, None, None, :].expand(-1, self.num_heads, self.num_clusters, -1)
            valid = valid.gather(-1, indices)
        indices, valid, _ = sort_selection(indices, valid, seq_len)

        def gather(t):  # [B, E, T, d] -> [B, E, C, k, d]
            flat = indices.flatten(2).unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
            return t.gather(2, flat).view(batch, self.num_heads, self.num_clusters, k, self.head_dim)

        qk_selected = apply_rope(gather(qk), indices, self.rotary_dim, self.rope_base)
        attended = F.scaled_dot_product_attention(qk_selected, qk_selected, gather(v), is_causal=True)
        attended = attended * valid.unsqueeze(-1).to(attended.dtype)
        head_out = torch.einsum("beckd,edh->beckh", attended, w_o).reshape(batch, -1, hidden)
        y = x.new_zeros(batch, seq_len, hidden)
        y.scatter_add_(1, indices.reshape(batch, -1, 1).expand(-1, -1, hidden), head_out)
        if self.training:
            self.update_centroids(unit, similarity)
        return y

    def new_cache(self, batch: int, max_len: int, dtype, device):
        raise ValueError("models with routing attention cannot generate: Routing Transformer clusters take top-k "
                         "over the whole sequence and have no causal mode")

    @torch.no_grad()
    def update_centroids(self, unit: torch.Tensor, similarity: torch.Tensor) -> None:
        """One online k-means step: move each centroid toward the mean of the tokens nearest to it."""
        nearest = similarity.argmax(dim=2)  # [B, E, T]
        real = torch.isfinite(similarity.amax(dim=2))  # padded tokens have -inf everywhere
        assign = F.one_hot(nearest, self.num_clusters).to(unit.dtype) * real.unsqueeze(-1)  # [B, E, T, C]
        sums = torch.einsum("betc,betd->ecd", assign, unit)
        counts = assign.sum(dim=(0, 2))  # [E, C]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        means = sums / counts.clamp(min=1).unsqueeze(-1)
        moved = self.centroid_decay * self.centroids + (1 - self.centroid_decay) * means.to(self.centroids.dtype)
        self.centroids.copy_(torch.where(counts.unsqueeze(-1) > 0, F.normalize(moved, dim=-1), self.centroids))
