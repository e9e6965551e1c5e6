"""Convert state dicts between the public MoSA reference code (github piotrpiekos/MoSA) and torch_mosa.

Reference PureMoSA: r.0.weight, QKV.W, O.W; its hybrid wraps them as mosa_heads.* and keeps the dense heads as
other_heads.W_QKV.weight / other_heads.W_O.weight. Shapes are identical, only names change; any prefix before
these names (e.g. a model's layer path) is kept.
"""

from __future__ import annotations

import torch

# (reference suffix, torch_mosa suffix); hybrid names first so they win over the bare PureMoSA names.
_NAME_PAIRS = (
    ("mosa_heads.r.0.weight", "sparse.router.weight"),
    ("mosa_heads.QKV.W", "sparse.w_qkv"),
    ("mosa_heads.O.W", "sparse.w_o"),
    ("other_heads.W_QKV.weight", "dense.w_qkv.weight"),
    ("other_heads.W_O.weight", "dense.w_o.weight"),
    ("r.0.weight", "router.weight"),
    ("QKV.W", "w_qkv"),
    ("O.W", "w_o"),
)


def _rename(state_dict: dict, pairs) -> dict:
    out = {}
    for key, value in state_dict.items():
        new_key = key
        for old, new in pairs:
            if key == old or key.endswith("." + old):
                new_key = key[: len(key) - len(old)] + new
                break
        if new_key in out:
            raise ValueError(f"two keys map to {new_key!r}; is this state dict already converted?")
        out[new_key] = value
    return out


def convert_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference-code names -> torch_mosa names (MoSAAttention, or HybridAttention with dense + MoSA heads).

    The reference has no causal routing, so each router gets `causal_threshold` zeros: calibrate them
    (torch_mosa.inference.calibrate_causal_thresholds) before using routing="causal".
    """
    converted = _rename(state_dict, _NAME_PAIRS)
    for key in [k for k in converted if k == "router.weight" or k.endswith(".router.weight")]:
        threshold_key = key[: -len("router.weight")] + "causal_threshold"
        converted.setdefault(threshold_key, torch.zeros(converted[key].shape[0], dtype=converted[key].dtype))
    return converted


def to_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch_mosa names -> reference-code names (the inverse of convert_reference_state_dict; causal thresholds,
    which the reference does not have, are dropped)."""
    kept = {k: v for k, v in state_dict.items() if not (k == "causal_threshold" or k.endswith(".causal_threshold"))}
    return _rename(kept, tuple((new, old) for old, new in _NAME_PAIRS))
