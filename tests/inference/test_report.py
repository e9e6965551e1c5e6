import pytest
import torch

from torch_mosa import MoSAConfig, MoSALM
from torch_mosa.inference import (calibrate_causal_thresholds, decode_one_token, decode_tokens_per_second,
                                  kv_cache_footprint)


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
    assert 0.75 / 8 <= per_head <= 1.25 / 8  # 1/sparsity of the tokens per head +-25% (uncalibrated: about 1/2)


def test_decode_throughput_times_only_the_new_tokens(monkeypatch):
    """A fake clock that advances 1 s per decode step: 3 sequences x 4 timed tokens in 4 s is 3 tokens/s, the
    warm-up steps run at the positions after the prompt but stay outside the timing."""
    import torch_mosa.inference.report as report

    clock, positions = [0.0], []

    def one_step_per_second(model, token, position, cache):
        clock[0] += 1.0
        positions.append(int(position))  # the position is a device tensor advanced in place
        return decode_one_token(model, token, position, cache)

    monkeypatch.setattr(report, "decode_one_token", one_step_per_second)
    monkeypatch.setattr(report.time, "perf_counter", lambda: clock[0])
    model = MoSALM(MoSAConfig.from_preset("micro", vocab_size=50, num_layers=1)).eval()
    rate = decode_tokens_per_second(model, torch.randint(0, 50, (3, 8)), new_tokens=4, warmup_tokens=2)
    assert rate == 3 * 4 / 4.0
    assert positions == list(range(8, 8 + 2 + 4))


def test_decode_throughput_refuses_more_than_max_seq_len():
    model = MoSALM(MoSAConfig.from_preset("micro", vocab_size=50, num_layers=1)).eval()
    with pytest.raises(ValueError, match="max_seq_len"):
        decode_tokens_per_second(model, torch.randint(0, 50, (1, 250)), new_tokens=4, warmup_tokens=4)
