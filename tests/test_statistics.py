"""Bootstrap intervals and paired per-window differences (torch_mosa/statistics.py)."""

import math

import pytest
import torch

from torch_mosa.statistics import bootstrap_interval, paired_difference


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    low, high = bootstrap_interval(values)
    assert 1.0 <= low < 2.5 < high <= 4.0
    assert bootstrap_interval(values) == (low, high)
    assert bootstrap_interval([5.0]) == (5.0, 5.0)
    assert all(math.isnan(v) for v in bootstrap_interval([]))


def test_paired_difference():
    paired = paired_difference([1.0, 2.0, 3.0], [1.5, 2.0, 3.5])
    assert paired["mean_difference"] == pytest.approx(-1 / 3) and paired["a_better_share"] == pytest.approx(2 / 3)
    assert paired["interval"][0] <= paired["mean_difference"] <= paired["interval"][1] <= 0
    assert paired["ppl_ratio"] == pytest.approx(math.exp(-1 / 3))
    with pytest.raises(ValueError, match="same windows"):
        paired_difference([1.0], [1.0, 2.0])
