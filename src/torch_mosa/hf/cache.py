"""torch_mosa's KV caches as a transformers `Cache` (the 5.x per-layer API), so that `generate()` decodes with causal
routing and the sparse per-head MoSA cache.

A thin adapter: the caches, the prefill and the one-token decode are torch_mosa.inference's own, so HF generation and
`MoSALM.generate` run the same code. Each transformers cache layer wraps one block's torch_mosa cache, which holds a
part per head kind (dense heads: every token; local heads: a window; MoSA heads: only the tokens each head selected,
at their positions). The layer's type says what it holds: `DenseCacheLayer` (dense heads only), `SlidingCacheLayer`
(local heads only: is_sliding, a window), `HybridCacheLayer` (dense and local heads) or `MoSACacheLayer` (sparse heads,
with the block's dense and local heads, if any). Keys and values are written by torch_mosa's prefill and decode, never
by transformers' `update(key_states, value_states)`, which has no meaning for per-head selections.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from torch_mosa.inference.cache import DenseCache, LocalCache, ModelCache, SparseCache, cache_parts
from torch_mosa.inference.decode import cache_dtype, decode_one_token, new_cache, prefill


class TorchMoSACacheLayer(CacheLayerMixin):
    """Base of the cache layers: one block's torch_mosa cache (`layer_cache`, its parts in `parts`) for `batch_size`
    sequences of up to `max_len` tokens; `cumulative_length` tokens seen so far. `pairs()`, `bytes_held()` and
    `bytes_allocated()` report what the block's torch_mosa caches hold. Made by `cache_layer`, which picks the type."""

    is_compileable = False
    is_sliding = False

    def __init__(self, layer_cache, batch_size: int, max_len: int):
        super().__init__()
        self.layer_cache = layer_cache
        self.parts = cache_parts(layer_cache)
        self.batch_size = batch_size
        self.max_len = max_len
        self.cumulative_length = 0
        self.is_initialized = True

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(type(part).__name__ for part in self.parts)})"

    def pairs(self) -> int:
        """Key-value pairs held (tokens x heads), as the paper counts them."""
        return sum(part.pairs() for part in self.parts)

    def bytes_held(self) -> int:
        return sum(part.bytes_held() for part in self.parts)

    def bytes_allocated(self) -> int:
        return sum(part.bytes_allocated() for part in self.parts)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError("MoSA cache layers are allocated by MoSACache, not from key/value states")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError("MoSA cache layers are written by torch_mosa's prefill and decode (per-head "
                                  "selections), not by key/value updates")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_len

    def offload(self):
        raise NotImplementedError("offloading is not supported by the MoSA cache")

    def prefetch(self):
        raise NotImplementedError("offloading is not supported by the MoSA cache")

    def reset(self) -> None:
        raise NotImplementedError("a MoSA cache is not reset: create a new MoSACache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by the MoSA cache: use greedy decoding or sampling")


class DenseCacheLayer(TorchMoSACacheLayer):
    """A block of dense heads only: every token, as transformers' DynamicLayer (not sliding, up to max_len)."""


class SlidingCacheLayer(TorchMoSACacheLayer):
    """A block of local heads only: a ring of the last `sliding_window` tokens (each token attends to itself and the
    `sliding_window - 1` before it), as transformers' DynamicSlidingWindowLayer."""

    is_sliding = True

    def __init__(self, layer_cache, batch_size: int, max_len: int):
        super().__init__(layer_cache, batch_size, max_len)
        self.sliding_window = self.parts[0].window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        if self.cumulative_length >= self.sliding_window:
            return self.sliding_window - 1 + query_length, offset
        return self.cumulative_length + query_length, offset

    def get_max_length(self) -> int:
        return self.sliding_window


class HybridCacheLayer(TorchMoSACacheLayer):
    """A block of dense and local heads: its dense heads see every token, so it is not sliding (up to max_len)."""


class MoSACacheLayer(TorchMoSACacheLayer):
    """A block with sparse heads (MoSA or fixed): per head only the tokens it selected, at their positions; in a
    hybrid block also its dense and local heads' caches. Not sliding: a selected token stays, up to max_len."""

    def overflow(self) -> dict:
        """Sparse-head joins dropped by the causal limits: {"capacity", "heads_per_token"}."""
        return ModelCache([self.layer_cache]).overflow()


def cache_layer(layer_cache, batch_size: int, max_len: int) -> TorchMoSACacheLayer:
    """The cache layer type for one block's torch_mosa cache, from the kinds of its parts."""
    kinds = {type(part) for part in cache_parts(layer_cache)}
    if SparseCache in kinds:
        layer_type = MoSACacheLayer
    elif kinds == {DenseCache}:
        layer_type = DenseCacheLayer
    elif kinds == {LocalCache}:
        layer_type = SlidingCacheLayer
    elif kinds == {DenseCache, LocalCache}:
        layer_type = HybridCacheLayer
    else:
        raise TypeError(f"no cache layer for a block whose caches are {sorted(k.__name__ for k in kinds)}")
    return layer_type(layer_cache, batch_size, max_len)


class MoSACache(Cache):
    """The caches of every block of `model` (a torch_mosa MoSALM) for `batch_size` sequences of up to `max_len` tokens.

    `prefill(model, input_ids, attention_mask)` fills an empty cache from a prompt (left-padded batches marked by
    attention_mask) and `decode(model, input_ids)` continues it, token by token; both return logits [B, n, vocab].
    """

    def __init__(self, model, batch_size: int, max_len: int, device: torch.device | str | None = None):
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
        if max_len > model.config.max_seq_len:
            raise ValueError(f"max_len={max_len} (prompt + new tokens) exceeds the model's context "
                             f"max_seq_len={model.config.max_seq_len}")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model_cache = new_cache(model, batch_size, max_len, cache_dtype(model, device), device)
        super().__init__(layers=[cache_layer(layer, batch_size, max_len) for layer in self.model_cache])
        self.max_len = max_len
        self.left_padded = True

    def prefill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B, T] into an empty cache -> logits [B, T, vocab] (causal routing)."""
        self._check_room(input_ids)
        if self.get_seq_length() != 0:
            raise ValueError(f"prefill needs an empty cache; this one holds {self.get_seq_length()} tokens")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        self.left_padded = bool(attention_mask.bool()[:, -1].all())
        logits = prefill(model, input_ids, attention_mask, self.model_cache)
        self._advance(input_ids.shape[1])
        return logits

    def decode(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, n] continuing the cached tokens -> logits [B, n, vocab], one token at a time.

        attention_mask, if given, covers the cached and the new tokens [B, cached + n]; new tokens must be real (1).
        """
        self._check_room(input_ids)
        if attention_mask is not None and not attention_mask[:, -input_ids.shape[1]:].bool().all():
            raise ValueError("attention_mask marks a token after the cached prompt as padding; only the prompt may "
                             "be padded (on the left)")
        if not self.left_padded:
            raise ValueError("the cached prompt batch is right-padded (attention_mask[:, -1] has a 0); continuing it "
                             "needs LEFT-padded prompts (tokenizer.padding_side = 'left')")
        logits = []
        for index in range(input_ids.shape[1]):
            logits.append(decode_one_token(model, input_ids[:, index:index + 1], self.get_seq_length(),
                                           self.model_cache))
            self._advance(1)
        return torch.stack(logits, dim=1)

    def _check_room(self, input_ids: torch.Tensor) -> None:
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids has batch size {input_ids.shape[0]}, the cache was made for "
                             f"batch_size={self.batch_size}")
        if self.get_seq_length() + input_ids.shape[1] > self.max_len:
            raise ValueError(f"the cache holds {self.get_seq_length()} tokens of max_len={self.max_len}; "
                             f"{input_ids.shape[1]} more do not fit")

    def _advance(self, num_tokens: int) -> None:
        for layer in self.layers:
            layer.cumulative_length += num_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor):
        raise NotImplementedError("beam search is not supported by the MoSA cache: use greedy decoding or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the MoSA cache cannot be cropped (assisted and contrastive decoding need it)")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("the MoSA cache cannot be repeated along the batch: expand the prompts instead")

    def batch_select_indices(self, indices: torch.Tensor):
        raise NotImplementedError("rows of the MoSA cache cannot be selected")
