"""Dense causal multi-head attention with RoPE on part of each head (the paper's dense heads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_mosa.checks import check_attention_input, check_head_sizes, check_routing
from torch_mosa.ops.decode import DenseDecodeInputs, layer_decode
from torch_mosa.ops.rope import apply_rope, rotary_dim_for


def padding_causal_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, 1, T, T] bool: causal and key is a real token; the diagonal stays open so that padded queries
    (left padding) have a finite softmax. Their outputs are never read."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, None, :]
    return allowed | torch.eye(seq_len, dtype=torch.bool, device=attention_mask.device)


class DenseAttention(nn.Module):
    """Causal multi-head attention. Parameters: w_qkv (Linear h -> num_heads*3*head_dim, per head Q|K|V),
    w_o (Linear num_heads*head_dim -> h), both bias-free (the reference code's `W_QKV`, `W_O`).
    forward(x [B, T, h], attention_mask [B, T] or None, routing, documents) -> [B, T, h]; with packed `documents`
    (a DocumentLayout) a token attends only inside its document, rotated by its RoPE position there."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, rotate_fraction: float = 0.5,
                 rope_base: float = 10000.0):
        super().__init__()
        check_head_sizes(hidden_size, num_heads, head_dim)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.rotary_dim = rotary_dim_for(head_dim, rotate_fraction)
        self.rope_base = rope_base
        self.w_qkv = nn.Linear(hidden_size, 3 * num_heads * head_dim, bias=False)
        self.w_o = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def project_qkv(self, x: torch.Tensor, positions: torch.Tensor, rope=None):
        """x [B, T, h], positions [T] or [B, T] -> q, k, v [B, H, T, d] with RoPE applied (looked up in `rope`, a
        rope_table, when given)."""
        batch, seq_len, _ = x.shape
        qkv = self.w_qkv(x).view(batch, seq_len, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        positions = positions.unsqueeze(-2) if positions.dim() == 2 else positions
        return apply_rope(q, positions, self.rotary_dim, self.rope_base, rope), \
            apply_rope(k, positions, self.rotary_dim, self.rope_base, rope), v

    def merge_heads(self, attended: torch.Tensor) -> torch.Tensor:
        batch, _, seq_len, _ = attended.shape
        return self.w_o(attended.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", documents=None) -> torch.Tensor:
        """Dense attention is causal under either routing mode; `routing` is accepted for a uniform call."""
        check_attention_input(x, self.hidden_size, self.w_o.weight, attention_mask, documents)
        check_routing(routing)
        positions = torch.arange(x.shape[1], device=x.device) if documents is None else documents.rope_positions
        q, k, v = self.project_qkv(x, positions)
        return self.merge_heads(self.attend(q, k, v, attention_mask, documents))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask=None,
               documents=None) -> torch.Tensor:
        """Causal attention of q, k, v [B, H, T, d] (keys masked by attention_mask [B, T], or kept inside their
        document) -> [B, H, T, d]."""
        if documents is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=documents.same_document())
        if attention_mask is None or bool(attention_mask.all()):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=padding_causal_mask(attention_mask, q.shape[2]))

    # ---- causal inference: a preallocated cache, prefill of a prompt, one decode step ----

    def new_cache(self, batch: int, max_len: int, dtype, device):
        from torch_mosa.inference.cache import DenseCache

        return DenseCache(batch, self.num_heads, self.head_dim, max_len, dtype, device)

    def prefill(self, x: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
        """Causal forward of the prompt x [B, T, h] (left padding by attention_mask), storing keys and values."""
        q, k, v = self.project_qkv(x, torch.arange(x.shape[1], device=x.device))
        cache.fill(k, v, attention_mask.bool())
        return self.merge_heads(self.attend(q, k, v, attention_mask))

    def decode_inputs(self, x: torch.Tensor, cache) -> DenseDecodeInputs:
        """The new token x [B, 1, h] projected through W_QKV, with W_O and the cache, for ops.decode.layer_decode."""
        return DenseDecodeInputs(self.w_qkv(x)[:, 0], self.w_o.weight, cache.k, cache.v, cache.key_real,
                                 cache.marks_real)

    def decode_step(self, x: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """x [B, 1, h] at `position` ([1] long tensor) -> [B, 1, h]: W_QKV, then ops.decode.layer_decode (on CUDA
        one kernel rotates, appends and attends over the real positions up to `position`, one more applies W_O),
        with fixed shapes: no host sync, CUDA-graph safe."""
        return layer_decode(x[:, 0], position, self.decode_inputs(x, cache), None, rotary_dim=self.rotary_dim,
                            rope_base=self.rope_base).unsqueeze(1)
