"""FLOP accounting of the paper (SPEC §3): forward pass only, an [i,j]x[j,k] matmul costs 2ijk.

Embeddings and norms are excluded. h = hidden size, d = head dim, T = sequence length, k = tokens per sparse head
(checks.selection_size, the definition the layers use). The formulas take numbers only; `model_flops` reads the
numbers of a MoSAConfig (or anything with its fields) without depending on the config class.
"""

from __future__ import annotations

from torch_mosa.checks import check_positive_int, selection_size

HEAD_KINDS = ("dense", "mosa", "fixed", "routing", "local")


def dense_head_flops(hidden_size: int, head_dim: int, seq_len: int) -> int:
    return 8 * hidden_size * head_dim * seq_len + 4 * head_dim * seq_len**2


def mosa_head_flops(hidden_size: int, head_dim: int, seq_len: int, k: int) -> int:
    return 8 * hidden_size * head_dim * k + 4 * head_dim * k**2 + 2 * hidden_size * seq_len + head_dim * k


def fixed_head_flops(hidden_size: int, head_dim: int, k: int) -> int:
    return 8 * hidden_size * head_dim * k + 4 * head_dim * k**2


def routing_head_flops(hidden_size: int, head_dim: int, seq_len: int, k: int, num_clusters: int) -> int:
    return 6 * hidden_size * head_dim * seq_len + 4 * head_dim * k**2 * num_clusters + 2 * head_dim * seq_len


def local_head_flops(hidden_size: int, head_dim: int, seq_len: int, window: int) -> int:
    return 8 * hidden_size * head_dim * seq_len + 4 * head_dim * seq_len * window


def ffn_flops(hidden_size: int, ffn_size: int, seq_len: int) -> int:
    """Two matmuls h -> ffn -> h; 16 h^2 T for the paper's ffn = 4h."""
    return 4 * hidden_size * ffn_size * seq_len


def head_flops(kind: str, hidden_size: int, head_dim: int, seq_len: int, sparsity: int | None = None,
               k: int | None = None, window: int | None = None) -> int:
    """Forward FLOPs of one head of `kind` (one of HEAD_KINDS). Sparse kinds take a sparsity or a fixed k
    (routing uses num_clusters = sparsity, or T // k with a fixed k); local takes a window (default: k)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"kind must be one of {HEAD_KINDS}, got {kind!r}")
    if kind == "dense":
        return dense_head_flops(hidden_size, head_dim, seq_len)
    if kind == "local" and window is not None:
        return local_head_flops(hidden_size, head_dim, seq_len, window)
    if k is None:
        if sparsity is None:
            raise ValueError(f"a {kind} head needs sparsity or k")
        k = selection_size(seq_len, check_positive_int("sparsity", sparsity), None)
    if kind == "mosa":
        return mosa_head_flops(hidden_size, head_dim, seq_len, k)
    if kind == "fixed":
        return fixed_head_flops(hidden_size, head_dim, k)
    if kind == "routing":
        return routing_head_flops(hidden_size, head_dim, seq_len, k, sparsity or max(1, seq_len // k))
    return local_head_flops(hidden_size, head_dim, seq_len, k)


def isoflop_num_heads(hidden_size: int, head_dim: int, num_heads: int, seq_len: int, sparsity: int,
                      keep_dense_heads: int = 4, kind: str = "mosa", window: int | None = None) -> int:
    """The largest E with keep_dense_heads * dense + E * sparse <= num_heads * dense (per layer, SPEC §3)."""
    check_positive_int("num_heads", num_heads)
    check_positive_int("sparsity", sparsity)
    if not 0 <= keep_dense_heads <= num_heads:
        raise ValueError(f"keep_dense_heads must be in [0, num_heads={num_heads}], got {keep_dense_heads}")
    if kind == "dense":
        raise ValueError("kind must be a sparse head kind (mosa, fixed, routing, local), got 'dense'")
    dense = dense_head_flops(hidden_size, head_dim, seq_len)
    sparse = head_flops(kind, hidden_size, head_dim, seq_len, sparsity=sparsity, window=window)
    return (num_heads - keep_dense_heads) * dense // sparse


def attention_flops(hidden_size: int, head_dim: int, seq_len: int, head_counts: dict[str, int],
                    sparsity: int | None = None, k: int | None = None, window: int | None = None) -> int:
    """Forward FLOPs of one attention layer holding head_counts[kind] heads of each kind (e.g. {'dense': 4,
    'mosa': 505}); a fixed k applies to the mosa, fixed and routing heads, the window to the local heads."""
    total = 0
    for kind, count in head_counts.items():
        if count:
            total += count * head_flops(kind, hidden_size, head_dim, seq_len, sparsity=sparsity,
                                        k=k if kind in ("mosa", "fixed", "routing") else None, window=window)
    return total


def attention_layer_flops(config, seq_len: int) -> int:
    """Forward FLOPs of one attention layer of `config` (a MoSAConfig) on a sequence of seq_len tokens."""
    return attention_flops(config.hidden_size, config.head_dim, seq_len, config.head_counts(),
                           sparsity=config.sparsity, k=config.k, window=config.local_window())


def model_flops(config, seq_len: int | None = None) -> int:
    """Forward FLOPs of the whole model of `config` (a MoSAConfig) on one sequence (default: config.max_seq_len)."""
    seq_len = config.max_seq_len if seq_len is None else check_positive_int("seq_len", seq_len)
    per_layer = attention_layer_flops(config, seq_len) + ffn_flops(config.hidden_size, config.ffn_size, seq_len)
    return config.num_layers * per_layer
