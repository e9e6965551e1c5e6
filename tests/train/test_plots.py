import pytest

pytest.importorskip("matplotlib")

from torch_mosa.train.plots import plot_loss_vs_lr  # noqa: E402


def runs(with_intervals: bool):
    rows = []
    for family, base in (("dense", 4.2), ("mosa", 3.9)):
        for lr, bump in ((5e-4, 0.2), (1e-3, 0.0), (2e-3, 0.1)):
            row = {"family": family, "lr": lr, "val_loss": base + bump}
            if with_intervals:
                row["val_loss_interval"] = (base + bump - 0.02, base + bump + 0.03)
            rows.append(row)
    return rows


@pytest.mark.parametrize("with_intervals", [False, True], ids=["points", "error-bars"])
def test_loss_vs_lr_plot(tmp_path, monkeypatch, with_intervals):
    """One line per family, with error bars when every run of the family has an interval."""
    import matplotlib.axes

    calls = []
    original = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, *args, **kwargs: calls.append(kwargs["yerr"]) or original(self, *args, **kwargs))
    path = plot_loss_vs_lr(runs(with_intervals), tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if with_intervals:
        assert len(calls) == 2  # one per family
        below, above = calls[0]
        assert below == pytest.approx([0.02] * 3) and above == pytest.approx([0.03] * 3)
    else:
        assert calls == []
