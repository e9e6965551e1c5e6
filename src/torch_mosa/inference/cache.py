"""KV caches, one per head kind (SPEC §5): dense heads keep every token, local heads a window, MoSA heads only the
tokens they selected. Keys are stored after RoPE, at their original positions.

Sizes are reported as key-value pairs and bytes held, as the paper counts them: T*H_dense + sum over MoSA heads of
their selected tokens.
"""

from __future__ import annotations

import torch

_GROW = 16  # MoSA caches grow in chunks of this many slots, so allocation stays close to what is held


class _KVCache:
    """Size accounting shared by every cache: `k`, `v` [B, heads, slots, d] and `pairs()` key-value pairs held."""

    def bytes_held(self) -> int:
        return 2 * self.pairs() * self.k.shape[-1] * self.k.element_size()

    def bytes_allocated(self) -> int:
        return self.k.nbytes + self.v.nbytes


class DenseCache(_KVCache):
    """k, v [B, H, max_len, d]; `key_real` [B, max_len] marks real (non-padding) tokens."""

    def __init__(self, batch: int, num_heads: int, head_dim: int, max_len: int, dtype, device):
        self.k = torch.zeros(batch, num_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.key_real = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> None:
        """k, v [B, H, n, d]; real [B, n]."""
        n = k.shape[2]
        if self.length + n > self.k.shape[2]:
            raise ValueError(f"KV cache is full: {self.length} + {n} tokens > max_len={self.k.shape[2]}")
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.key_real[:, self.length:self.length + n] = real
        self.length += n

    def keys_values_mask(self):
        """k, v [B, H, max_len, d] and the attention mask [B, 1, 1, max_len] of the stored tokens.

        The whole buffer, not the filled prefix: a key length that grows every step gives attention a new shape per
        token, and backends that plan per shape (cuDNN) would plan again at every step.
        """
        return self.k, self.v, self.key_real[:, None, None, :]

    def pairs(self) -> int:
        return self.k.shape[0] * self.k.shape[1] * self.length


class LocalCache(DenseCache):
    """A ring of `window` slots per head: token at position p lives in slot p % window."""

    def __init__(self, batch: int, num_heads: int, head_dim: int, window: int, dtype, device):
        super().__init__(batch, num_heads, head_dim, window, dtype, device)
        self.window = window

    def append(self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> None:
        n = k.shape[2]
        keep = min(n, self.window)  # of a long prefill only the last `window` tokens can ever be attended again
        slots = torch.arange(self.length + n - keep, self.length + n, device=k.device) % self.window
        self.k[:, :, slots] = k[:, :, n - keep:]
        self.v[:, :, slots] = v[:, :, n - keep:]
        self.key_real[:, slots] = real[:, n - keep:]
        self.length += n

    def pairs(self) -> int:
        return self.k.shape[0] * self.k.shape[1] * min(self.length, self.window)


class MoSACache(_KVCache):
    """Per head only its selected tokens: k, v [B, E, capacity, d], `counts` [B, E] tokens held per head."""

    def __init__(self, batch: int, num_heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, num_heads, _GROW, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.counts = torch.zeros(batch, num_heads, dtype=torch.long, device=device)

    def _reserve(self, needed: int) -> None:
        capacity = self.k.shape[2]
        if needed <= capacity:
            return
        grown = -(-needed // _GROW) * _GROW
        pad = (0, 0, 0, grown - capacity)
        self.k = torch.nn.functional.pad(self.k, pad)
        self.v = torch.nn.functional.pad(self.v, pad)

    def fill(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Prefill: k, v [B, E, K, d] sorted by position with valid [B, E, K] slots first."""
        self._reserve(k.shape[2] + 1)
        self.k[:, :, :k.shape[2]] = k * valid.unsqueeze(-1)
        self.v[:, :, :k.shape[2]] = v * valid.unsqueeze(-1)
        self.counts = valid.sum(-1)

    def append(self, k: torch.Tensor, v: torch.Tensor, joined: torch.Tensor) -> None:
        """One token: k, v [B, E, d] written only where joined [B, E]."""
        self._reserve(int(self.counts.max()) + 2)  # +1 for this token, +1 so the write slot of any head exists
        slot = self.counts.view(*self.counts.shape, 1, 1).expand(-1, -1, 1, k.shape[-1])
        keep = joined.view(*joined.shape, 1, 1)
        self.k.scatter_(2, slot, torch.where(keep, k.unsqueeze(2), self.k.gather(2, slot)))
        self.v.scatter_(2, slot, torch.where(keep, v.unsqueeze(2), self.v.gather(2, slot)))
        self.counts = self.counts + joined.long()

    def keys_values_mask(self):
        """k, v [B, E, C, d] and mask [B, E, 1, C]. Slot 0 stays open for a head that holds nothing yet, so the
        softmax is finite; that head's output is multiplied by a zero score."""
        slots = torch.arange(self.k.shape[2], device=self.k.device)
        mask = (slots < self.counts.unsqueeze(-1)) | (slots == 0)
        return self.k, self.v, mask.unsqueeze(2)

    def pairs(self) -> int:
        return int(self.counts.sum())


class LayerCache:
    """The caches of one attention layer: `dense`, `local`, `sparse` (None where the layer has no such heads)."""

    def __init__(self, dense=None, local=None, sparse=None):
        self.dense, self.local, self.sparse = dense, local, sparse

    def parts(self):
        return [c for c in (self.dense, self.local, self.sparse) if c is not None]


class ModelCache(list):
    """One LayerCache per block, with the size report the paper uses."""

    def pairs(self) -> int:
        return sum(c.pairs() for layer in self for c in layer.parts())

    def bytes_held(self) -> int:
        return sum(c.bytes_held() for layer in self for c in layer.parts())

    def bytes_allocated(self) -> int:
        return sum(c.bytes_allocated() for layer in self for c in layer.parts())
