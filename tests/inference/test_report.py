import torch

from torch_mosa import MoSAConfig, MoSALM
from torch_mosa.inference import calibrate_causal_thresholds, decode_tokens_per_second, kv_cache_footprint


def test_dense_footprint_is_layers_times_heads():
    model = MoSALM(MoSAConfig.from_preset("micro", vocab_size=50)).eval()
    footprint = kv_cache_footprint(model, torch.randint(0, 50, (2, 40)))
    config = model.config
    assert footprint["pairs_per_token"] == config.num_layers * config.num_heads
    assert footprint["bytes_per_token"] == footprint["pairs_per_token"] * 2 * config.head_dim * 4


def test_mosa_footprint_is_dense_part_plus_selected():
    model = MoSALM(MoSAConfig.from_preset("micro", attention="mosa", sparsity=8, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 64))
    calibrate_causal_thresholds(model, [ids])
    footprint = kv_cache_footprint(model, ids)
    dense_part = model.config.num_layers * 4
    mosa_part = footprint["pairs_per_token"] - dense_part
    per_head = mosa_part / (model.config.num_layers * model.config.num_sparse_heads)
    assert 0.5 / 8 < per_head < 2 / 8  # about 1/sparsity of the tokens per head


def test_decode_throughput_is_measured():
    model = MoSALM(MoSAConfig.from_preset("micro", vocab_size=50, num_layers=1)).eval()
    assert decode_tokens_per_second(model, torch.randint(0, 50, (2, 8)), new_tokens=4, warmup_tokens=1) > 0
