"""Causal training (issue 11): threshold EMA, capacity, overflow counting, `mosa train --routing causal`."""

import csv

import pytest
import torch

from torch_mosa import MoSAConfig, MoSALM
from torch_mosa.inference import set_causal_limits
from torch_mosa.layers import MoSAAttention
from torch_mosa.layers.mosa import threshold_targets
from torch_mosa.train import TrainConfig, Trainer
from torch_mosa.train.causal import causal_capacity, setup_causal_training

VOCAB = 61


def causal_training_model(capacity=None, momentum=0.9, **overrides):
    config = MoSAConfig.from_preset("micro", attention="mosa", sparsity=4, vocab_size=VOCAB, **overrides)
    model = MoSALM(config).double().train()
    set_causal_limits(model, capacity=capacity)
    for layer in model.mosa_layers:
        layer.set_threshold_momentum(momentum)
    return model


def thresholds(model):
    return [layer.causal_threshold.clone() for layer in model.mosa_layers]


def restore(model, saved):
    for layer, value in zip(model.mosa_layers, saved):
        layer.causal_threshold.copy_(value)


def test_causal_training_forward_is_strictly_causal():
    """A training forward (grad on, thresholds moving) with a capacity that bites: changing the tokens after t
    changes no logit at or before t, exactly, given the thresholds the step starts from."""
    model = causal_training_model(capacity=9)
    ids = torch.randint(0, VOCAB, (2, 40))
    model(ids, routing="causal")  # warm the EMA so the step below moves it by momentum, as in training
    start = thresholds(model)
    base, _ = model(ids, routing="causal")
    assert any(not torch.equal(a, b) for a, b in zip(start, thresholds(model))), "the step must move the thresholds"
    assert model.last_causal_stats["capacity_overflow"] > 0, "the capacity must bite for the test to mean something"
    for t in (0, 7, 23, 38):
        restore(model, start)
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, VOCAB, changed[:, t + 1:].shape)
        logits, _ = model(changed, routing="causal")
        assert torch.equal(logits[:, :t + 1], base[:, :t + 1]), f"position {t}"


@pytest.mark.parametrize("include_first", [False, True])
def test_thresholds_converge_to_the_target_join_rate(include_first):
    torch.manual_seed(1)
    layer = MoSAAttention(32, num_heads=6, head_dim=8, sparsity=8, include_first=include_first).double()
    layer.set_threshold_momentum(0.9)
    layer.causal_threshold.fill_(-5.0)  # far from the logits' scale: the warm start must bring it in
    target = layer.selection_size(64) / 64
    for _ in range(20):
        layer(torch.randn(4, 64, 32, dtype=torch.float64), routing="causal")
    assert layer.causal_threshold.dtype == torch.float64 and layer.causal_threshold.device.type == "cpu"
    with torch.no_grad():
        layer(torch.randn(16, 64, 32, dtype=torch.float64), routing="causal")
    join_rate = float(layer.last_causal_joins) / (16 * 64 * 6)
    assert abs(join_rate - target) < 0.25 * target, (join_rate, target)


def test_threshold_targets_keep_exactly_k_and_skip_rows_without_choice():
    logits = torch.randn(3, 10, 4, dtype=torch.float64)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2, :8] = False  # two real tokens: with include_first, one candidate for one pick -> no choice
    sums, rows = threshold_targets(logits, [4, 4, 2], include_first=True, attention_mask=mask)
    assert rows.tolist() == [2.0] * 4
    candidates = logits[:2, 1:]  # rows 0, 1: first token forced, 3 picks among the other 9
    for b in range(2):
        one, _ = threshold_targets(logits[b:b + 1], [4], include_first=True)
        assert ((candidates[b] > one).sum(0) == 3).all()
    torch.testing.assert_close(sums, sum(threshold_targets(logits[b:b + 1], [4], True)[0] for b in range(2)))


def test_overflow_counts_match_a_brute_force_count():
    model = causal_training_model(capacity=3)
    captured = []
    for layer in model.mosa_layers:
        layer.router.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    ids = torch.randint(0, VOCAB, (3, 32))
    saved = thresholds(model)
    model(ids, routing="causal")
    stats = model.last_causal_stats
    expected_overflow = expected_joined = 0
    forced_first = model.config.include_first  # token 0 joins every head whatever its logit
    for layer_logits, threshold in zip(captured, saved):  # the thresholds the step routed with
        for b in range(3):
            for e in range(layer_logits.shape[-1]):
                wanted = sum(1 for t in range(32) if layer_logits[b, t, e] > threshold[e] or (t == 0 and forced_first))
                expected_overflow += max(0, wanted - 3)
                expected_joined += min(wanted, 3)
    assert expected_overflow > 0
    assert int(stats["capacity_overflow"]) == expected_overflow
    assert int(stats["joined"]) == expected_joined
    assert int(stats["heads_per_token_overflow"]) == 0
    assert int(stats["slots"]) == 3 * 32 * sum(layer.num_heads for layer in model.mosa_layers)


@pytest.mark.parametrize("mode", ["eval", "no_grad", "topk", "momentum_unset"])
def test_threshold_update_only_in_causal_training(mode):
    model = causal_training_model(momentum=None if mode == "momentum_unset" else 0.5)
    for layer in model.mosa_layers:
        layer.causal_threshold.normal_()
    before = thresholds(model)
    ids = torch.randint(0, VOCAB, (2, 24))
    if mode == "eval":
        model.eval()(ids, routing="causal")
        model.generate(ids[:, :8], 4)
    elif mode == "no_grad":
        with torch.no_grad():
            model(ids, routing="causal")
    else:
        model(ids, routing="topk" if mode == "topk" else "causal")
    assert all(torch.equal(a, b) for a, b in zip(before, thresholds(model)))
    model.train()
    model(ids, routing="causal")  # the control: a causal training forward does move them
    moved = any(not torch.equal(a, b) for a, b in zip(before, thresholds(model)))
    assert moved == (mode != "momentum_unset")


def test_setup_sets_capacity_and_momentum():
    model = causal_training_model(momentum=None)
    meter = setup_causal_training(model, seq_len=64, capacity_factor=1.5, momentum=0.95, resumed=False)
    assert causal_capacity(model, 64, 1.5) == 24 and meter.capacity == 24  # k = 64 // 4 = 16
    assert all(layer.capacity == 24 and layer.threshold_momentum == 0.95 and not layer.threshold_warm
               for layer in model.mosa_layers)
    assert causal_capacity(model, 64, 100.0) == 64 and causal_capacity(model, 64, None) is None


@pytest.mark.parametrize("field, value, message", [
    ("routing", "threshold", "routing must be one of"),
    ("causal_capacity_factor", 0.5, "causal_capacity_factor must be a number >= 1"),
    ("threshold_momentum", 1.0, r"threshold_momentum must be in \[0, 1\)"),
])
def test_bad_causal_training_config(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_bad_threshold_momentum_names_the_argument():
    with pytest.raises(ValueError, match="momentum must be a number in"):
        MoSAAttention(16, 2, head_dim=4, sparsity=4).set_threshold_momentum(1.5)


def test_causal_training_logs_join_and_overflow_rates(tmp_path, tiny_model, tiny_train):
    summary = Trainer(tiny_model(), tiny_train(routing="causal", causal_capacity_factor=1.0, steps=4),
                      tmp_path).train()
    with (tmp_path / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row["train_loss"]]
    assert len(rows) == 4
    for row in rows:
        assert 0 < float(row["causal_join_rate"]) < 1 and 0 <= float(row["causal_overflow_rate"]) < 1
    assert summary["routing"] == "causal" and summary["causal_capacity"] == 4  # k = 16 // 4
    assert summary["causal_target_rate"] == 0.25 and summary["causal_overflow_rate"] > 0  # capacity = k bites
