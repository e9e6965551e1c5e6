"""RoPE: the table lookup decoding uses gives exactly the computed rotation."""

import pytest
import torch

from torch_mosa.ops.rope import apply_rope, rope_table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rotary_dim", [0, 2, 32])
def test_table_lookup_equals_computed_rope(dtype, rotary_dim):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 64, dtype=dtype)
    positions = torch.randint(0, 997, (7,))
    table = rope_table(997, rotary_dim, 10000.0, dtype, "cpu")
    looked_up = apply_rope(x, positions, rotary_dim, 10000.0, table)
    assert torch.equal(looked_up, apply_rope(x, positions, rotary_dim, 10000.0))
    assert looked_up.dtype == dtype


def test_float64_input_with_a_float32_table_is_computed_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    positions = torch.tensor([1, 500, 77])
    table = rope_table(501, 32, 10000.0, torch.float32, "cpu")
    assert table[0].dtype == torch.float32
    assert torch.equal(apply_rope(x, positions, 32, 10000.0, table), apply_rope(x, positions, 32, 10000.0))
