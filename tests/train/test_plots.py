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


def test_ppl_vs_tokens_plot(tmp_path, monkeypatch):
    """One line per series on one log perplexity axis, error bars from each point's interval."""
    import matplotlib.axes

    from torch_mosa.train.plots import plot_ppl_vs_tokens

    calls = []
    original = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, *args, **kwargs: calls.append((args, kwargs["yerr"]))
                        or original(self, *args, **kwargs))
    points = [{"series": name, "tokens": tokens, "ppl": ppl, "ppl_interval": (ppl - 1, ppl + 2)}
              for name, rows in (("dense", ((80e6, 39.0), (40e6, 60.9))), ("mosa", ((40e6, 47.2),)))
              for tokens, ppl in rows]
    path = plot_ppl_vs_tokens(points, tmp_path / "tokens.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(calls) == 2
    (tokens, ppl), (below, above) = calls[0]
    assert list(tokens) == [40, 80] and list(ppl) == [60.9, 39.0]  # sorted by tokens, in millions
    assert below == pytest.approx([1, 1]) and above == pytest.approx([2, 2])
