"""MoSAConfig: one dataclass builds every model of the paper (SPEC §4) and the CPU-sized `micro` preset."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from torch_mosa.checks import dataclass_from_dict, selection_size
from torch_mosa.flops import isoflop_num_heads

ATTENTION_KINDS = ("dense", "mosa", "pure_mosa", "fixed", "routing", "local")
ROUTED_ATTENTION_KINDS = ("mosa", "pure_mosa")  # the kinds with MoSA routers, which router_aux_loss_weight trains
FIXED_OFFSETS = ("shared", "per_head")  # where each fixed head's stride starts (MoSAConfig.fixed_offsets)
SPARSE_HEAD_KIND = {"mosa": "mosa", "pure_mosa": "mosa", "fixed": "fixed", "routing": "routing", "local": "local"}

# The paper's dense baselines (SPEC §4) plus `micro`, which trains on a CPU in minutes.
PRESETS = {
    "micro": dict(num_layers=2, hidden_size=128, ffn_size=512, head_dim=32, num_heads=6, max_seq_len=256),
    "tiny": dict(num_layers=6, hidden_size=512, ffn_size=2048, head_dim=64, num_heads=9, max_seq_len=1024),
    "small": dict(num_layers=9, hidden_size=1024, ffn_size=4096, head_dim=64, num_heads=9, max_seq_len=1024),
    "medium": dict(num_layers=18, hidden_size=1024, ffn_size=4096, head_dim=64, num_heads=9, max_seq_len=1024),
    "large": dict(num_layers=27, hidden_size=1280, ffn_size=5120, head_dim=64, num_heads=16, max_seq_len=1024),
}


@dataclass
class MoSAConfig:
    """A decoder-only LM. `num_heads` is the head count of the dense model this one is FLOP-matched to.

    attention: dense | mosa (hybrid: `num_dense_heads` dense heads kept + sparse MoSA heads) | pure_mosa |
    fixed | routing | local (hybrids with that sparse kind). `num_sparse_heads=None` means IsoFLOP-matched
    (SPEC §3) to `num_heads` dense heads at `max_seq_len`. `router_aux_loss_weight` > 0 adds the MoSA routers'
    top-k membership loss (for causal routing, SPEC §5); 0 keeps paper runs exact. Only mosa and pure_mosa have
    routers: a weight > 0 with any other attention is refused. `restart_positions_per_document`: on packed input
    (document ids) RoPE positions restart at 0 in every document (True: a packed document computes what it computes
    alone), or keep the token's place in the row (False: the same up to rounding, since attention stays inside a
    document and RoPE scores depend on position differences only). `fixed_offsets` (attention="fixed"):
    "shared", every fixed head strides from the first token (SPEC §2), or "per_head", head e from offset e mod
    sparsity, so the heads together cover every token (a fixed-pattern control with MoSA's coverage).
    """

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
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        for name in ("vocab_size", "num_layers", "hidden_size", "head_dim", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.router_aux_loss_weight >= 0:
            raise ValueError(f"router_aux_loss_weight must be >= 0, got {self.router_aux_loss_weight}")
        if self.router_aux_loss_weight > 0 and self.attention not in ROUTED_ATTENTION_KINDS:
            raise ValueError(f"router_aux_loss_weight={self.router_aux_loss_weight} needs MoSA routers: allowed with "
                             f"attention in {ROUTED_ATTENTION_KINDS}, got attention={self.attention!r} (use 0)")
        if self.fixed_offsets not in FIXED_OFFSETS:
            raise ValueError(f"fixed_offsets must be one of {FIXED_OFFSETS}, got {self.fixed_offsets!r}")
        if self.fixed_offsets != "shared" and self.attention != "fixed":
            raise ValueError(f"fixed_offsets={self.fixed_offsets!r} applies to attention='fixed' only, got "
                             f"attention={self.attention!r} (leave fixed_offsets='shared')")
        if self.ffn_size is None:
            self.ffn_size = 4 * self.hidden_size
        if self.attention == "dense":
            if self.sparsity is not None or self.k is not None:
                raise ValueError(f"attention='dense' attends to every token and takes no sparsity or k, got "
                                 f"sparsity={self.sparsity!r}, k={self.k!r}: drop them or choose a sparse attention "
                                 f"({', '.join(kind for kind in ATTENTION_KINDS if kind != 'dense')})")
            return
        if self.sparsity is None and self.k is None:
            raise ValueError(f"attention={self.attention!r} needs a sparsity (or a fixed k)")
        if self.sparsity is not None and (not isinstance(self.sparsity, int) or self.sparsity < 1):
            raise ValueError(f"sparsity must be an integer >= 1, got {self.sparsity!r}")
        if self.k is not None and self.attention not in ("mosa", "pure_mosa"):
            raise ValueError(f"a fixed k is supported for MoSA heads only, not attention={self.attention!r}")
        if self.num_dense_heads is None:
            self.num_dense_heads = 0 if self.attention == "pure_mosa" else min(4, self.num_heads)
        if self.attention == "pure_mosa" and self.num_dense_heads:
            raise ValueError(f"pure_mosa keeps no dense heads, got num_dense_heads={self.num_dense_heads}")
        if self.num_sparse_heads is None:
            if self.sparsity is None:
                raise ValueError("with a fixed k, give num_sparse_heads (IsoFLOP matching needs a sparsity)")
            self.num_sparse_heads = isoflop_num_heads(
                self.hidden_size, self.head_dim, self.num_heads, self.max_seq_len, self.sparsity,
                keep_dense_heads=self.num_dense_heads, kind=SPARSE_HEAD_KIND[self.attention], window=self.window)
        if self.num_sparse_heads < 1:
            raise ValueError(f"num_sparse_heads resolved to {self.num_sparse_heads}; the dense budget of "
                             f"{self.num_heads} heads leaves no room after {self.num_dense_heads} dense heads")

    def head_counts(self) -> dict[str, int]:
        """Heads per layer by kind, e.g. {'dense': 4, 'mosa': 505}."""
        if self.attention == "dense":
            return {"dense": self.num_heads}
        counts = {"dense": self.num_dense_heads} if self.num_dense_heads else {}
        counts[SPARSE_HEAD_KIND[self.attention]] = self.num_sparse_heads
        return counts

    def local_window(self) -> int | None:
        """The local heads' window: `window`, or the tokens per sparse head at max_seq_len (checks.selection_size);
        fixed when the layer is built, so the FLOPs at any sequence length use it too. None without local heads."""
        if self.attention != "local":
            return None
        return self.window or selection_size(self.max_seq_len, self.sparsity, None)

    @classmethod
    def from_preset(cls, name: str, attention: str = "dense", sparsity: int | None = None, **overrides) -> "MoSAConfig":
        """A paper preset (micro, tiny, small, medium, large); attention='mosa' with a sparsity builds the
        IsoFLOP hybrid with 4 dense heads kept."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], "attention": attention, "sparsity": sparsity, "preset": name, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MoSAConfig":
        return dataclass_from_dict(cls, values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
