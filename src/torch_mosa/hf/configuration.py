"""The transformers configuration of a MoSA language model: torch_mosa's MoSAConfig fields, as config.json holds them."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from torch_mosa.checks import check_routing
from torch_mosa.config import MoSAConfig as CoreConfig

CORE_FIELDS = tuple(f.name for f in dataclasses.fields(CoreConfig))


class MoSAConfig(PretrainedConfig):
    """torch_mosa.MoSAConfig for transformers (`model_type = "mosa"`): `from_mosa_config(core)` / `to_mosa_config()`.

    Every field of the core config is written to config.json, resolved (e.g. `num_sparse_heads` as counted, not None),
    so the file describes the architecture on its own. `routing` is what a plain forward uses: "causal" (default; a
    token's outputs never depend on later tokens, as a causal LM in the Hugging Face ecosystem must behave, and the
    only routing a KV cache supports) or "topk" (the paper's expert-choice routing, which sees the whole window).
    """

    model_type = "mosa"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the KV cache (renamed in transformers 5.24)
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "max_seq_len",
                     "intermediate_size": "ffn_size"}

    vocab_size: int = 8000
    num_layers: int = 6
    hidden_size: int = 512
    ffn_size: int | None = None
    head_dim: int = 64
    num_heads: int = 9
    max_seq_len: int = 1024
    attention: str = "dense"
    sparsity: int | None = None
    k: int | None = None
    num_sparse_heads: int | None = None
    num_dense_heads: int | None = None
    window: int | None = None
    include_first: bool = True
    router_aux_loss_weight: float = 0.0
    restart_positions_per_document: bool = True
    fixed_offsets: str = "shared"
    rotate_fraction: float = 0.5
    rope_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    preset: str | None = None
    routing: str = "causal"
    use_cache: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_routing(self.routing)
        # the core config checks every field (naming it) and resolves the derived ones
        resolved = CoreConfig.from_dict({name: getattr(self, name) for name in CORE_FIELDS})
        for name in CORE_FIELDS:
            setattr(self, name, getattr(resolved, name))

    @classmethod
    def from_mosa_config(cls, config: CoreConfig, **kwargs) -> "MoSAConfig":
        """The transformers config of a torch_mosa config; kwargs set transformers fields (eos_token_id, routing...)."""
        if not isinstance(config, CoreConfig):
            raise TypeError(f"config must be a torch_mosa.MoSAConfig, got {type(config).__name__}")
        return cls(**config.to_dict(), **kwargs)

    def to_mosa_config(self) -> CoreConfig:
        return CoreConfig.from_dict({name: getattr(self, name) for name in CORE_FIELDS})

    def to_diff_dict(self) -> dict:
        """What save_pretrained writes: every architecture field, even those equal to the defaults."""
        return {**super().to_diff_dict(), **{name: getattr(self, name) for name in (*CORE_FIELDS, "routing")}}
