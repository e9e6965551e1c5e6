"""KV caches, one per head kind (SPEC §5): dense heads keep every token, local heads a window, sparse (MoSA, fixed)
heads only the tokens they selected. Keys are stored after RoPE, at their original positions.

Every cache is allocated once, at its final size, and updated in place with indices held on the device, so a decode
step never reads a number back to the host and can be captured as a CUDA graph. The attention layers own the
updates (`prefill`, `decode_step`), as gpt-fast keeps `cache.update` in its attention module.

Sizes are reported as key-value pairs and bytes held, as the paper counts them: T*H_dense + sum over MoSA heads of
their selected tokens; `bytes_allocated` is what the preallocated buffers take.
"""

from __future__ import annotations

import torch


class _KVCache:
    """Size accounting shared by every cache: `k`, `v` [B, heads, slots, d] and `pairs()` key-value pairs held."""

    def bytes_held(self) -> int:
        return 2 * self.pairs() * self.k.shape[-1] * self.k.element_size()

    def bytes_allocated(self) -> int:
        return self.k.nbytes + self.v.nbytes


class DenseCache(_KVCache):
    """k, v [B, H, max_len, d] by position; `key_real` [B, max_len] marks the real tokens written so far. Dense
    layers decode through ops.decode.layer_decode, which rotates inside its kernel, so this cache holds no RoPE
    table (LocalCache does: the ring step looks its rows up).

    The real-token marks are the same for every dense layer of a model, so ModelCache lets its dense layers share
    one `key_real` and only the first marks each new token (`marks_real`): one small kernel per decode step instead
    of one per layer."""

    def __init__(self, batch: int, num_heads: int, head_dim: int, max_len: int, dtype, device):
        self.k = torch.zeros(batch, num_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.key_real = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.marks_real = True

    def reset(self) -> None:
        """Forget every token (the buffers stay: a captured CUDA graph keeps pointing at them)."""
        self.key_real.zero_()

    def fill(self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> None:
        """Prefill: k, v [B, H, T, d] of positions 0..T-1; real [B, T] (False for left padding)."""
        length = k.shape[2]
        if length > self.k.shape[2]:
            raise ValueError(f"the prompt has {length} tokens but the cache holds max_len={self.k.shape[2]}")
        self.k[:, :, :length] = k
        self.v[:, :, :length] = v
        self.key_real[:, :length] = real

    def update(self, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """One token at `position` ([1] long tensor) for every row: k, v [B, H, 1, d]."""
        self.k.index_copy_(2, position, k.to(self.k.dtype))
        self.v.index_copy_(2, position, v.to(self.v.dtype))
        if self.marks_real:
            self.key_real.index_fill_(1, position, True)

    def keys_values_mask(self):
        """k, v [B, H, max_len, d] and the attention mask [B, 1, 1, max_len] of the stored tokens.

        The whole buffer, not the filled prefix: a fixed key length keeps shapes fixed across steps (no replanning
        per shape, and a CUDA graph can be replayed)."""
        return self.k, self.v, self.key_real[:, None, None, :]

    def pairs(self) -> int:
        return self.k.shape[1] * int(self.key_real.sum())


class LocalCache(DenseCache):
    """A ring of `window` slots per head: the token at position p lives in slot p % window."""

    def __init__(self, batch: int, num_heads: int, head_dim: int, window: int, dtype, device, rope=None):
        super().__init__(batch, num_heads, head_dim, window, dtype, device)
        self.rope = rope  # ops.rope.rope_table for every position the ring step can decode at, or None
        self.window = window

    def fill(self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> None:
        length = k.shape[2]
        keep = min(length, self.window)  # of a long prompt only the last `window` tokens can ever be attended again
        slots = torch.arange(length - keep, length, device=k.device) % self.window
        self.k[:, :, slots] = k[:, :, length - keep:]
        self.v[:, :, slots] = v[:, :, length - keep:]
        self.key_real[:, slots] = real[:, length - keep:]

    def update(self, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        super().update(position % self.window, k, v)


class SparseCache(_KVCache):
    """Per head only the tokens it selected, in arrival order: k, v [B, E, capacity + 1, d]; `counts` [B, E] tokens
    held per head; `first` [B] each row's first real position (fixed heads stride from it).

    Overflow policy: a head holds at most `capacity` tokens; a token that would join a full head does not join it
    (the full causal forward drops it alike when the layer's capacity is set) and is counted in `capacity_overflow`;
    joins dropped by a per-token head limit are counted in `token_overflow` (both 0-dim long tensors on the device:
    read them after generation, not inside the loop). The extra last slot is scratch: the reference decode
    (ops/decode) writes the tokens that joined nothing there, so every update is one unconditional scatter.
    The layers update the cache through `torch_mosa.ops.decode.sparse_decode`.
    """

    def __init__(self, batch: int, num_heads: int, head_dim: int, capacity: int, dtype, device):
        self.capacity = capacity
        self.k = torch.zeros(batch, num_heads, capacity + 1, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.counts = torch.zeros(batch, num_heads, dtype=torch.long, device=device)
        self.first = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity_overflow = torch.zeros((), dtype=torch.long, device=device)
        self.token_overflow = torch.zeros((), dtype=torch.long, device=device)

    def reset(self) -> None:
        for t in (self.counts, self.first, self.capacity_overflow, self.token_overflow):
            t.zero_()

    def fill(self, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Prefill: k, v [B, E, W, d] with each head's counts [B, E] members first, in position order."""
        width = min(k.shape[2], self.capacity)
        self.k[:, :, :width] = k[:, :, :width]
        self.v[:, :, :width] = v[:, :, :width]
        self.counts.copy_(counts)
        self.first.copy_(attention_mask.bool().long().argmax(dim=1))

    def pairs(self) -> int:
        return int(self.counts.sum())

    def overflow(self) -> dict:
        return {"capacity": int(self.capacity_overflow), "heads_per_token": int(self.token_overflow)}


class LayerCache:
    """The caches of one hybrid layer: `dense`, `local`, `sparse` (None where the layer has no such heads)."""

    def __init__(self, dense=None, local=None, sparse=None):
        self.dense, self.local, self.sparse = dense, local, sparse

    def parts(self):
        return [c for c in (self.dense, self.local, self.sparse) if c is not None]


def cache_parts(layer_cache) -> list:
    """A block's caches: the parts of a LayerCache (hybrid block), or the block's one cache."""
    return layer_cache.parts() if isinstance(layer_cache, LayerCache) else [layer_cache]


class ModelCache(list):
    """One cache per block (a DenseCache for a dense layer, a LayerCache for a hybrid), with the paper's size report.

    Its dense-head caches (not the local rings, whose slots are not positions) share one real-token mask, written
    by the first of them; layers run in order, so each reads the marks of the step it is in."""

    def __init__(self, layers=()):
        super().__init__(layers)
        dense = [c for c in self.caches() if type(c) is DenseCache]
        for c in dense[1:]:
            if c.key_real.shape == dense[0].key_real.shape and c.key_real.device == dense[0].key_real.device:
                c.key_real, c.marks_real = dense[0].key_real, False

    def caches(self) -> list:
        return [c for layer in self for c in cache_parts(layer)]

    def reset(self) -> None:
        for c in self.caches():
            c.reset()

    def pairs(self) -> int:
        return sum(c.pairs() for c in self.caches())

    def bytes_held(self) -> int:
        return sum(c.bytes_held() for c in self.caches())

    def bytes_allocated(self) -> int:
        return sum(c.bytes_allocated() for c in self.caches())

    def overflow(self) -> dict:
        """Sparse-head joins dropped by the causal limits, summed over layers: {"capacity", "heads_per_token"}."""
        total = {"capacity": 0, "heads_per_token": 0}
        for c in self.caches():
            if isinstance(c, SparseCache):
                for key, value in c.overflow().items():
                    total[key] += value
        return total
