"""`mosa calibrate`, `mosa eval --routing topk causal` and `mosa generate` on a tiny byte-level run."""

import json

import pytest

TINY = ["--num-layers", "1", "--hidden-size", "32", "--ffn-size", "64", "--head-dim", "8", "--max-seq-len", "64",
        "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--no-progress"]


@pytest.fixture
def mosa_run(tmp_path, mosa, shared_data):
    data = shared_data / "gutenberg" / "0[14]_*.txt"
    assert mosa("train", "--out", tmp_path / "run", "--steps", 2, "--data", data, "--tokenizer", "byte",
                "--attention", "mosa", "--sparsity", 4, *TINY) == 0
    return tmp_path / "run"


def test_calibrate_then_eval_both_routings(mosa_run, mosa, capsys):
    assert mosa("calibrate", mosa_run, "--batches", 2, "--seq-len", 32) == 0
    assert "wrote calibrated thresholds" in capsys.readouterr().out
    assert mosa("eval", mosa_run, "--routing", "topk", "causal", "--seq-len", 32, "--max-batches", 2,
                "--decode-tokens", 4, "--json") == 0
    topk, causal = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert topk["routing"] == "topk" and causal["routing"] == "causal"
    assert causal["decode_tokens_per_s"] > 0 and "decode_tokens_per_s" not in topk
    assert topk["tokens"] == causal["tokens"] and causal["ppl"] > 1
    # 4 dense heads hold every token; each MoSA head about a quarter of them (sparsity 4, calibrated)
    num_mosa_heads = json.loads((mosa_run / "config.json").read_text())["model"]["num_sparse_heads"]
    assert 4 + 0.1 * num_mosa_heads < causal["kv_pairs_per_token"] < 4 + 0.5 * num_mosa_heads



def test_calibrate_reads_a_few_windows_by_default_with_a_progress_bar(mosa_run, mosa, capsys):
    capsys.readouterr()
    assert mosa("calibrate", mosa_run) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("calibrating on 16 windows of 64 tokens (2 batches of 8) spread over the ")
    assert "calibrate (a pass per MoSA layer):   0%|          | 0/2" in captured.err  # 2 batches x 1 layer
    assert mosa("calibrate", mosa_run, "--batches", 3, "--batch-size", 2, "--no-progress") == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("calibrating on 6 windows of 64 tokens (3 batches of 2)") and captured.err == ""


def test_generate_prints_continuation_and_cache(mosa_run, mosa, capsys):
    assert mosa("generate", mosa_run, "--prompt", "To be", "--max-new-tokens", 5, "--no-stop") == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("To be")
    assert "5 new tokens" in captured.err and "key-value pairs" in captured.err
    assert "uncalibrated" in captured.err  # this run was never calibrated
    assert mosa("calibrate", mosa_run, "--batches", 1, "--seq-len", 32) == 0
    capsys.readouterr()
    assert mosa("generate", mosa_run, "--prompt", "To be", "--max-new-tokens", 2) == 0
    assert "uncalibrated" not in capsys.readouterr().err


def test_generate_errors(mosa_run, mosa, capsys, tmp_path):
    assert mosa("generate", mosa_run, "--prompt", "", "--max-new-tokens", 2) == 2
    assert "prompt" in capsys.readouterr().err
    assert mosa("generate", mosa_run, "--prompt", "x" * 70, "--max-new-tokens", 2) == 2
    assert "max_seq_len" in capsys.readouterr().err
    assert mosa("generate", tmp_path / "nowhere", "--prompt", "hi") == 2
    assert "nowhere" in capsys.readouterr().err
