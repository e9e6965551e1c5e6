import pytest
import torch

from torch_mosa import FixedSparseAttention, LocalAttention, MoSAAttention, MoSAConfig, MoSALM, flops


def test_tiny_dense_forward_flops():
    assert flops.model_flops(MoSAConfig.from_preset("tiny")) == 54_760_833_024  # 54.76 GFLOPs (SPEC §3)


@pytest.mark.parametrize("sparsity,expected", [(2, 13), (4, 31), (8, 69), (16, 142), (32, 276), (64, 505),
                                               (128, 848), (256, 1277)])
def test_isoflop_heads_tiny_keep4(sparsity, expected):
    assert flops.isoflop_num_heads(512, 64, 9, 1024, sparsity, keep_dense_heads=4) == expected


def test_isoflop_heads_pure():
    assert flops.isoflop_num_heads(512, 64, 9, 1024, 2, keep_dense_heads=0) == 23


def test_one_head_counted_by_hand():
    """h=2, d=1, T=4, k=2, each matmul [i,j]x[j,k] costing 2ijk."""
    # dense: QKV 2*4*2*3 = 48, O 2*4*1*2 = 16, QK^T 2*4*1*4 = 32, AV 32
    assert flops.head_flops("dense", 2, 1, 4) == 48 + 16 + 32 + 32
    # MoSA on k=2 tokens: QKV 2*2*2*3 = 24, O 2*2*1*2 = 8, QK^T 2*2*1*2 = 8, AV 8, router 2*4*2*1 = 16,
    # score scaling k*d = 2
    assert flops.head_flops("mosa", 2, 1, 4, k=2) == 24 + 8 + 8 + 8 + 16 + 2
    assert flops.head_flops("mosa", 2, 1, 4, sparsity=2) == 66  # k = 4 // 2
    assert flops.head_flops("fixed", 2, 1, 4, k=2) == 24 + 8 + 8 + 8  # no router, no scaling
    # routing, 2 clusters of k=2: shared QK, V and O 3 * 2*4*2*1 = 48, per cluster QK^T 8 + AV 8, and
    # 2*T*d = 8 for the centroid similarities
    assert flops.head_flops("routing", 2, 1, 4, k=2, sparsity=2) == 48 + 2 * 16 + 8
    # local, window 2: projections as dense (64), scores and values over 2 keys per query 2 * 2*4*1*2 = 32
    assert flops.head_flops("local", 2, 1, 4, window=2) == 64 + 32
    assert flops.ffn_flops(2, 8, 4) == 2 * (2 * 4 * 2 * 8)  # up and down projections


def test_tiny_heads_by_hand():
    """The Tiny shapes (h=512, d=64, T=1024): the figures behind the paper's 54.76 GFLOPs and E = 142, 505."""
    h, d, T = 512, 64, 1024
    assert flops.head_flops("dense", h, d, T) == 536_870_912
    assert flops.ffn_flops(h, 4 * h, T) == 4_294_967_296
    assert flops.head_flops("mosa", h, d, T, sparsity=64) == 5_309_440
    assert flops.head_flops("fixed", h, d, T, sparsity=64) == 4_259_840
    assert flops.head_flops("routing", h, d, T, sparsity=64) == 205_651_968
    assert flops.head_flops("local", h, d, T, window=32) == 276_824_064


@pytest.mark.parametrize("kind,expected", [("mosa", 142), ("fixed", 150), ("routing", 12), ("local", 9)])
def test_isoflop_heads_tiny_sparsity16_by_kind(kind, expected):
    """The 5 freed dense heads' budget 5 * 536,870,912 over one sparse head (k = 64): mosa 18,878,464,
    fixed 17,825,792, routing (16 clusters) 218,234,880, local (window 64) 285,212,672."""
    assert flops.isoflop_num_heads(512, 64, 9, 1024, 16, keep_dense_heads=4, kind=kind) == expected


def test_tiny_isoflop_model_by_hand():
    """Tiny rho=64: 6 layers x (4 dense heads + 505 MoSA heads + FFN)."""
    per_layer = 4 * 536_870_912 + 505 * 5_309_440 + 4_294_967_296
    assert flops.model_flops(MoSAConfig.from_preset("tiny", attention="mosa", sparsity=64)) == 6 * per_layer


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


@pytest.mark.parametrize("seq_len,sparsity,expected_k", [(1000, 64, 15), (1024, 64, 16), (10, 64, 2), (11, 3, 3)])
def test_fixed_layer_takes_the_tokens_the_flops_count(seq_len, sparsity, expected_k):
    """One 'tokens per head' (SPEC §1: k = max(2, T // sparsity), at most T) for the layer and the accounting
    (issue 14 defect 2: at T=1000, sparsity 64 the layer took 16 tokens, the accounting 15)."""
    layer = FixedSparseAttention(8, 2, 4, sparsity=sparsity)
    indices, scores = layer.select(torch.zeros(1, seq_len, 8))
    taken = indices.shape[-1]
    assert taken == expected_k == layer.selection_size(seq_len)
    assert int(indices.max()) < seq_len and bool((indices.diff(dim=-1) > 0).all())  # distinct real positions
    h, d = 512, 64
    assert flops.head_flops("fixed", h, d, seq_len, sparsity=sparsity) == flops.head_flops("fixed", h, d, seq_len,
                                                                                            k=taken)


@pytest.mark.parametrize("seq_len,sparsity", [(1000, 64), (10, 64), (37, 4)])
def test_mosa_layer_takes_the_tokens_the_flops_count(seq_len, sparsity):
    indices, _ = MoSAAttention(8, 2, 4, sparsity=sparsity).select(torch.randn(1, seq_len, 8))
    h, d = 512, 64
    assert flops.head_flops("mosa", h, d, seq_len, sparsity=sparsity) == flops.head_flops("mosa", h, d, seq_len,
                                                                                           k=indices.shape[-1])


def test_local_flops_use_the_layer_window_at_any_length():
    """The local layer's window is fixed when it is built (from max_seq_len); the accounting at a shorter T uses it."""
    config = MoSAConfig.from_preset("micro", attention="local", sparsity=8)
    window = next(m for m in MoSALM(config).modules() if isinstance(m, LocalAttention)).window
    h, d, T = config.hidden_size, config.head_dim, 64
    counts = config.head_counts()
    expected = config.num_layers * (counts["dense"] * flops.dense_head_flops(h, d, T)
                                    + counts["local"] * flops.local_head_flops(h, d, T, window)
                                    + flops.ffn_flops(h, config.ffn_size, T))
    assert flops.model_flops(config, seq_len=T) == expected
