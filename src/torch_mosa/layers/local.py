"""Sliding-window causal attention: token t attends to tokens t-window+1 .. t.

Blocked so that time and memory are O(T * window): queries in block b (window tokens) see keys of blocks b-1 and b
only, never a T x T matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_mosa.checks import check_positive_int
from torch_mosa.layers.dense import DenseAttention
from torch_mosa.ops.rope import rope_table


class LocalAttention(DenseAttention):
    """Same parameters and forward as DenseAttention (forward(x [B, T, h], attention_mask [B, T] or None, routing,
    documents) -> [B, T, h]); only `attend` differs: each token sees the last `window` tokens."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, window: int = 64,
                 rotate_fraction: float = 0.5, rope_base: float = 10000.0):
        super().__init__(hidden_size, num_heads, head_dim, rotate_fraction, rope_base)
        self.window = check_positive_int("window", window)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask=None,
               documents=None) -> torch.Tensor:
        """Windowed causal attention of q, k, v [B, H, T, d], blocked -> [B, H, T, d]; with packed `documents`
        the window also stops at the token's document start."""
        seq_len, device = q.shape[2], q.device
        w = min(self.window, seq_len)
        num_blocks = -(-seq_len // w)
        padded = num_blocks * w

        def blocks(t):  # [B, H, T, d] -> [B, H, nb, w, d], zero-padded at the end
            return F.pad(t, (0, 0, 0, padded - seq_len)).unflatten(2, (num_blocks, w))

        qb, kb, vb = blocks(q), blocks(k), blocks(v)
        # keys of the previous block (zeros before block 0) followed by the block's own keys: [.., nb, 2w, d]
        kb = torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :-1], kb], dim=3)
        vb = torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :-1], vb], dim=3)
        block_start = torch.arange(num_blocks, device=device) * w
        query_pos = block_start[:, None] + torch.arange(w, device=device)  # [nb, w]
        key_pos = block_start[:, None] - w + torch.arange(2 * w, device=device)  # [nb, 2w]
        delta = query_pos[:, :, None] - key_pos[:, None, :]
        allowed = (delta >= 0) & (delta < self.window) & (key_pos[:, None, :] >= 0)  # [nb, w, 2w]
        if documents is not None:  # ids -1 before the row and past its end: those keys match no real query
            ids = F.pad(documents.ids, (w, padded - seq_len), value=-1)
            same = ids[:, query_pos + w][..., :, None] == ids[:, key_pos + w][:, :, None, :]  # [B, nb, w, 2w]
            allowed = (allowed & same)[:, None]
        if attention_mask is not None:
            real = F.pad(attention_mask.bool(), (w, padded - seq_len))  # index key_pos + w
            key_real = real[:, key_pos + w]  # [B, nb, 2w]
            allowed = allowed & key_real[:, None, :, None, :]
            allowed = allowed | (delta == 0)  # padded queries keep themselves: finite softmax, output unused
        attended = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed)
        return attended.flatten(2, 3)[:, :, :seq_len]

    def new_cache(self, batch: int, max_len: int, dtype, device):
        from torch_mosa.inference.cache import LocalCache

        return LocalCache(batch, self.num_heads, self.head_dim, self.window, dtype, device,
                          rope=rope_table(max_len, self.rotary_dim, self.rope_base, dtype, device))

    def decode_step(self, x: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """x [B, 1, h] at `position` ([1] long tensor) -> [B, 1, h]: one attention call over the whole ring (the
        token at position p lives in slot p % window, so slots are not positions as layer_decode's dense heads
        need); fixed shapes: no host sync, CUDA-graph safe."""
        q, k, v = self.project_qkv(x, position, cache.rope)
        cache.update(position, k, v)
        keys, values, mask = cache.keys_values_mask()
        return self.merge_heads(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
