"""`mosa inspect` on tiny byte-level runs: a readable PNG, each head's most-picked tokens, clear errors."""

import numpy as np
from PIL import Image

TINY = ["--num-layers", "3", "--hidden-size", "32", "--ffn-size", "64", "--head-dim", "8", "--max-seq-len", "64",
        "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--no-progress", "--tokenizer", "byte"]


def _train(mosa, shared_data, out, attention, *extra):
    data = shared_data / "gutenberg" / "0[14]_*.txt"
    assert mosa("train", "--out", out, "--steps", 2, "--data", data, "--attention", attention, *extra, *TINY) == 0
    return out


def test_inspect_draws_heads_and_prints_their_tokens(tmp_path, mosa, shared_data, capsys):
    run = _train(mosa, shared_data, tmp_path / "run", "mosa", "--sparsity", 4)
    capsys.readouterr()
    out = tmp_path / "heads.png"
    assert mosa("inspect", run, "--text", "To be, or not to be: that is the question.", "--out", out,
                "--heads", 4) == 0
    printed = capsys.readouterr().out
    # 3 MoSA layers: the first, middle and last are drawn; 4 of each layer's heads are listed
    for layer in (0, 1, 2):
        assert f"MoSA layer {layer}:" in printed
    assert "raise --heads" in printed
    assert printed.count("head   3:") == 3 and "head   4:" not in printed
    assert " x" in printed.splitlines()[1]
    assert out.stat().st_size > 5_000
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 20  # a colour scale, not a blank canvas

    assert mosa("inspect", run, "--text", "To be", "--out", out, "--layers", 1, "--top", 2) == 0
    printed = capsys.readouterr().out
    assert "MoSA layer 1:" in printed and "MoSA layer 0:" not in printed


def test_inspect_errors(tmp_path, mosa, shared_data, capsys):
    dense = _train(mosa, shared_data, tmp_path / "dense", "dense")
    capsys.readouterr()
    assert mosa("inspect", dense, "--text", "hello", "--out", tmp_path / "x.png") == 2
    assert "no MoSA heads" in capsys.readouterr().err
    run = _train(mosa, shared_data, tmp_path / "run", "mosa", "--sparsity", 4)
    capsys.readouterr()
    assert mosa("inspect", run, "--text", "hello", "--layers", 7, "--out", tmp_path / "x.png") == 2
    assert "--layers [7]" in capsys.readouterr().err
    assert mosa("inspect", run, "--text", "", "--out", tmp_path / "x.png") == 2
    assert "--text" in capsys.readouterr().err
    assert mosa("inspect", run, "--text", "x" * 70, "--out", tmp_path / "x.png") == 2
    assert "max_seq_len" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
