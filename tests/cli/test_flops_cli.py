import json
import subprocess
import sys

from torch_mosa.cli import main


def test_flops_json(capsys):
    assert main(["flops", "--preset", "tiny", "--attention", "mosa", "--sparsity", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_dense_heads"] == 4 and report["num_mosa_heads"] == 505
    assert report["dense_forward_flops"] == 54_760_833_024
    assert report["forward_flops"] <= report["dense_forward_flops"]
    assert round(report["params"] / 1e6) == 423


def test_flops_table(capsys):
    assert main(["flops", "--preset", "tiny", "--attention", "mosa", "--sparsity", "64"]) == 0
    out = capsys.readouterr().out
    assert "505 mosa" in out and "54.76" in out


def test_bad_preset_is_a_clear_error(capsys):
    assert main(["flops", "--preset", "huge"]) == 2
    assert "preset must be one of" in capsys.readouterr().err


def test_console_entry_point_module():
    out = subprocess.run([sys.executable, "-m", "torch_mosa.cli", "flops", "--preset", "micro", "--attention", "dense",
                          "--json"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["num_mosa_heads"] == 0


def test_dense_with_a_sparsity_is_refused(mosa, capsys):
    assert mosa("flops", "--attention", "dense", "--sparsity", 8) == 2
    assert "attention='dense' attends to every token and takes no sparsity" in capsys.readouterr().err
