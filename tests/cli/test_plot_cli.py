

TINY = ["--num-layers", "1", "--hidden-size", "32", "--ffn-size", "64", "--head-dim", "8", "--max-seq-len", "32",
        "--batch-size", "4", "--seq-len", "16", "--vocab-size", "64", "--eval-batches", "2", "--eval-interval", "2",
        "--log-interval", "1", "--no-progress"]



def test_plot_writes_a_png_comparing_runs(tmp_path, mosa, capsys):
    for attention, sparsity in (("dense", []), ("mosa", ["--sparsity", 4])):  # dense takes no sparsity
        assert mosa("train", "--out", tmp_path / attention, "--steps", 4, "--attention", attention, *sparsity,
                    *TINY) == 0
    out = tmp_path / "curves.png"
    assert mosa("plot", tmp_path / "dense", tmp_path / "mosa", "--out", out, "--labels", "dense", "MoSA") == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_plot_errors(tmp_path, mosa, capsys):
    assert mosa("plot", tmp_path / "nothing", "--out", tmp_path / "x.png") == 2
    assert "has no metrics.csv rows" in capsys.readouterr().err
    assert mosa("plot", tmp_path / "a", tmp_path / "b", "--labels", "one") == 2
    assert "--labels gives 1 labels for 2 runs" in capsys.readouterr().err
