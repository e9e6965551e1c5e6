import torch

from torch_mosa import HybridAttention, MoSAAttention, convert_reference_state_dict
from torch_mosa.convert import to_reference_state_dict


def test_reference_names_to_ours_and_back():
    layer = HybridAttention(16, 8, num_mosa_heads=3, num_dense_heads=2, sparsity=4)
    ours = layer.state_dict()  # causal_threshold is zero, as the converter fills it in
    reference = to_reference_state_dict(ours)
    assert set(reference) == {"mosa_heads.r.0.weight", "mosa_heads.QKV.W", "mosa_heads.O.W",
                              "other_heads.W_QKV.weight", "other_heads.W_O.weight"}
    back = convert_reference_state_dict(reference)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_reference_checkpoint_loads_strictly():
    """A reference-layout state dict (names and shapes of the public code) loads into our layers, keeping prefixes."""
    E, h, d = 3, 16, 8
    reference = {"blocks.0.attn.r.0.weight": torch.randn(E, h), "blocks.0.attn.QKV.W": torch.randn(E, h, 3 * d),
                 "blocks.0.attn.O.W": torch.randn(E, d, h)}
    converted = convert_reference_state_dict(reference)
    layer = MoSAAttention(h, E, d, sparsity=2)
    layer.load_state_dict({k.removeprefix("blocks.0.attn."): v for k, v in converted.items()}, strict=True)
    assert torch.equal(layer.w_qkv, reference["blocks.0.attn.QKV.W"])
    assert torch.equal(layer.causal_threshold, torch.zeros(E))
