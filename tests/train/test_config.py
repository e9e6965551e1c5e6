import math

import pytest

from torch_mosa.train import TrainConfig


def test_defaults_follow_the_paper():
    config = TrainConfig()
    assert (config.lr, config.betas, config.weight_decay, config.grad_clip, config.warmup_steps) == (
        2.5e-4, (0.9, 0.999), 0.0, 0.25, 4000)


def test_schedule_warms_up_linearly_then_decays_to_a_tenth():
    config = TrainConfig(steps=100, warmup_steps=4000, warmup_fraction=0.1, lr=1.0)
    assert config.warmup == 10  # 4000 capped at 10% of the run
    lrs = [config.lr_at(step) for step in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 45 / 89)))


def test_round_trips_through_a_dict():
    config = TrainConfig(steps=7, betas=(0.8, 0.9), data="x.txt")
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("field, value, match", [
    ("steps", 0, "steps must be an integer >= 1"),
    ("lr", float("nan"), "lr must be a positive finite number"),
    ("batch_size", 6, "divisible by grad_accum_steps"),
    ("device", "tpu", "device must be one of"),
    ("tokenizer", "sentencepiece", "tokenizer must be 'bpe' or 'byte'"),
])
def test_bad_values_are_named(field, value, match):
    values = {"grad_accum_steps": 4} if field == "batch_size" else {}
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**values, field: value})


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"stepz": 3})
