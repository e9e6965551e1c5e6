import json



TINY = ["--num-layers", "1", "--hidden-size", "32", "--ffn-size", "64", "--head-dim", "8", "--batch-size", "4",
        "--seq-len", "32", "--eval-batches", "2", "--no-progress"]



def test_compare_trains_the_isoflop_family_and_writes_table_and_plot(tmp_path, mosa, capsys, shared_data):
    data = shared_data / "gutenberg" / "0[14]_*.txt"
    argv = ["compare", "--attention", "mosa", "fixed", "--sparsity", 1, 4, "--data", data, "--tokenizer", "byte",
            "--tokens", 4 * 32 * 3, "--out", tmp_path, *TINY]
    assert mosa(*argv) == 0
    results = json.loads((tmp_path / "comparison.json").read_text())
    assert [(r["attention"], r["sparsity"]) for r in results] == [("dense", 1), ("mosa", 4), ("fixed", 4)]
    assert all(r["steps"] == 3 and r["tokens"] == 384 for r in results)
    dense_flops = results[0]["forward_flops_per_token"]
    assert all(r["forward_flops_per_token"] <= dense_flops for r in results)  # IsoFLOP at the training length
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("\n| ") == 4 and "| mosa | 4 | 4 dense + " in table
    assert (tmp_path / "ppl_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "val ppl" in capsys.readouterr().out

    # A finished comparison is reused, not retrained.
    mtime = (tmp_path / "dense" / "summary.json").stat().st_mtime_ns
    assert mosa(*argv) == 0
    assert (tmp_path / "dense" / "summary.json").stat().st_mtime_ns == mtime


def test_compare_errors(tmp_path, mosa, capsys):
    assert mosa("compare", "--tokens", 10, "--out", tmp_path, *TINY) == 2
    assert "tokens=10 is less than one step" in capsys.readouterr().err
    assert mosa("compare", "--tokens", 1000, "--sparsity", 0, "--out", tmp_path, *TINY) == 2
    assert "sparsities must be integers >= 1" in capsys.readouterr().err
