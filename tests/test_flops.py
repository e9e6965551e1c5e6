import pytest

from torch_mosa import MoSAConfig, flops


def test_tiny_dense_forward_flops():
    assert flops.model_flops(MoSAConfig.from_preset("tiny")) == 54_760_833_024  # 54.76 GFLOPs (SPEC §3)


@pytest.mark.parametrize("sparsity,expected", [(2, 13), (4, 31), (8, 69), (16, 142), (32, 276), (64, 505),
                                               (128, 848), (256, 1277)])
def test_isoflop_heads_tiny_keep4(sparsity, expected):
    assert flops.isoflop_num_heads(512, 64, 9, 1024, sparsity, keep_dense_heads=4) == expected


def test_isoflop_heads_pure():
    assert flops.isoflop_num_heads(512, 64, 9, 1024, 2, keep_dense_heads=0) == 23


@pytest.mark.parametrize("kind", ["mosa", "fixed", "routing", "local"])
def test_isoflop_is_largest_within_budget(kind):
    h, d, H, T, s = 512, 64, 9, 1024, 16
    E = flops.isoflop_num_heads(h, d, H, T, s, keep_dense_heads=4, kind=kind)
    budget = H * flops.dense_head_flops(h, d, T)
    per_head = flops.head_flops(kind, h, d, T, sparsity=s)
    assert 4 * flops.dense_head_flops(h, d, T) + E * per_head <= budget
    assert 4 * flops.dense_head_flops(h, d, T) + (E + 1) * per_head > budget


def test_head_formulas():
    h, d, T, k = 512, 64, 1024, 16
    assert flops.mosa_head_flops(h, d, T, k) == 8 * h * d * k + 4 * d * k * k + 2 * h * T + d * k
    assert flops.fixed_head_flops(h, d, k) == 8 * h * d * k + 4 * d * k * k
    assert flops.routing_head_flops(h, d, T, k, 64) == 6 * h * d * T + 4 * d * k * k * 64 + 2 * d * T
    assert flops.local_head_flops(h, d, T, 32) == 8 * h * d * T + 4 * d * T * 32
    assert flops.ffn_flops(h, 4 * h, T) == 16 * h * h * T


def test_isoflop_model_flops_do_not_exceed_dense():
    dense = flops.model_flops(MoSAConfig.from_preset("tiny"))
    for attention in ("mosa", "pure_mosa", "fixed", "routing", "local"):
        assert flops.model_flops(MoSAConfig.from_preset("tiny", attention=attention, sparsity=16)) <= dense


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        flops.head_flops("sparse", 512, 64, 1024, sparsity=4)
    with pytest.raises(ValueError, match="sparsity"):
        flops.isoflop_num_heads(512, 64, 9, 1024, 0)
    with pytest.raises(ValueError, match="keep_dense_heads"):
        flops.isoflop_num_heads(512, 64, 9, 1024, 4, keep_dense_heads=10)
