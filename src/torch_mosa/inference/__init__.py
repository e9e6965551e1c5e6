"""Causal inference for MoSA models: causal routing thresholds, sparse KV caches, prefill/decode, generation."""

from torch_mosa.inference.cache import DenseCache, LocalCache, ModelCache, SparseCache
from torch_mosa.inference.calibrate import calibrate_causal_thresholds
from torch_mosa.inference.decode import decode_one_token, new_cache, prefill
from torch_mosa.inference.generate import generate, sample
from torch_mosa.inference.graphs import GraphedDecodeStep
from torch_mosa.inference.limits import set_causal_limits, suggested_causal_limits
from torch_mosa.inference.report import decode_tokens_per_second, kv_cache_footprint

__all__ = ["DenseCache", "GraphedDecodeStep", "LocalCache", "ModelCache", "SparseCache", "calibrate_causal_thresholds",
           "decode_one_token", "decode_tokens_per_second", "generate", "kv_cache_footprint", "new_cache", "prefill",
           "sample", "set_causal_limits", "suggested_causal_limits"]
