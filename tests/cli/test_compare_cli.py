import json

import pytest

TINY = ["--num-layers", "1", "--hidden-size", "32", "--ffn-size", "64", "--head-dim", "8", "--batch-size", "4",
        "--seq-len", "32", "--eval-batches", "2", "--no-progress"]


@pytest.fixture
def compare_argv(tmp_path, shared_data):
    data = shared_data / "gutenberg" / "0[14]_*.txt"
    return ["compare", "--attention", "mosa", "fixed", "--sparsity", 1, 4, "--data", data, "--tokenizer", "byte",
            "--tokens", 4 * 32 * 3, "--out", tmp_path, *TINY]


def test_compare_sweeps_rates_and_reports_each_family_at_its_best(tmp_path, mosa, capsys, compare_argv):
    assert mosa(*compare_argv, "--lr", 1e-4, 3e-2) == 0
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    runs = comparison["runs"]
    assert [(r["family"], r["lr"]) for r in runs] == [(f, lr) for f in ("dense", "mosa-s4", "fixed-s4")
                                                       for lr in (1e-4, 3e-2)]
    assert all(r["steps"] == 3 and r["tokens"] == 384 for r in runs)
    dense_flops = runs[0]["forward_flops_per_token"]
    assert all(r["forward_flops_per_token"] <= dense_flops for r in runs)  # IsoFLOP at the training length
    for best in comparison["best"]:
        family = [r for r in runs if r["family"] == best["family"]]
        assert best["val_loss"] == min(r["val_loss"] for r in family)
    assert {b["lr"] for b in comparison["best"]} == {3e-2}  # in 3 steps the higher rate learns more
    table = (tmp_path / "comparison.md").read_text()
    assert "| mosa | 4 | 0.03 | 384 | 4 dense + " in table and "| family | lr 0.0001 | lr 0.03 |" in table
    for plot in ("ppl_vs_sparsity.png", "loss_vs_lr.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "val ppl" in capsys.readouterr().out

    # A finished comparison is reused, not retrained.
    mtime = (tmp_path / "dense-lr0.03" / "summary.json").stat().st_mtime_ns
    assert mosa(*compare_argv, "--lr", 1e-4, 3e-2) == 0
    assert (tmp_path / "dense-lr0.03" / "summary.json").stat().st_mtime_ns == mtime

    # A changed setting does not reuse the stale runs: refused, naming what differs.
    capsys.readouterr()
    assert mosa(*[a if a != 4 * 32 * 3 else 4 * 32 * 2 for a in compare_argv], "--lr", 3e-2) == 2
    err = capsys.readouterr().err
    assert "dense-lr0.03' holds a run of another configuration" in err and "train.steps: 3 vs 2" in err


def test_compare_without_lr_sweeps_a_default_grid_and_says_so(tmp_path, mosa, capsys, compare_argv):
    argv = [a for a in compare_argv if a != "fixed"]
    assert mosa(*[a if a != 4 * 32 * 3 else 4 * 32 for a in argv], "--sparsity", 4) == 0
    out = capsys.readouterr().out
    assert "sweeping learning rates 0.0015 0.003 0.006 for every model" in out
    assert len(json.loads((tmp_path / "comparison.json").read_text())["runs"]) == 3  # mosa-s4 at 3 rates


def test_compare_errors(tmp_path, mosa, capsys):
    assert mosa("compare", "--tokens", 10, "--out", tmp_path, *TINY) == 2
    assert "tokens=10 is less than one step" in capsys.readouterr().err
    assert mosa("compare", "--tokens", 1000, "--sparsity", 0, "--out", tmp_path, *TINY) == 2
    assert "sparsities must be integers >= 1" in capsys.readouterr().err
    assert mosa("compare", "--tokens", 1000, "--lr", -1, "--out", tmp_path, *TINY) == 2
    assert "lr must be a positive finite number" in capsys.readouterr().err
