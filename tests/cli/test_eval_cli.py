import json

import pytest


TINY = ["--num-layers", "1", "--hidden-size", "32", "--ffn-size", "64", "--head-dim", "8", "--max-seq-len", "32",
        "--batch-size", "4", "--seq-len", "16", "--eval-batches", "2", "--no-progress"]



@pytest.fixture
def byte_run(tmp_path, mosa, shared_data):
    """A 2-step run on two books, byte-level."""
    data = shared_data / "gutenberg" / "0[14]_*.txt"
    assert mosa("train", "--out", tmp_path / "run", "--steps", 2, "--data", data, "--tokenizer", "byte", *TINY) == 0
    return tmp_path / "run"


def test_eval_on_the_runs_data_and_on_raw_text(byte_run, mosa, capsys, shared_data):
    capsys.readouterr()
    assert mosa("eval", byte_run, "--seq-len", 16, "--max-batches", 3, "--json") == 0
    own = json.loads(capsys.readouterr().out)
    assert own["tokens"] == 3 * 8 * 16 and own["split"] == "val" and own["bpb"] > 0
    summary = json.loads((byte_run / "summary.json").read_text())
    assert own["checkpoint"] == summary["checkpoint"]

    text = shared_data / "gutenberg" / "12_us_constitution.txt"
    assert mosa("eval", byte_run / "checkpoints" / "step_00000002", "--data", text, "--seq-len", 16,
                "--max-batches", 2) == 0
    out = capsys.readouterr().out
    assert "12_us_constitution.txt (train, 16 of " in out and "256 tokens)" in out and "bits/byte" in out


def test_eval_errors(byte_run, mosa, capsys, tmp_path):
    assert mosa("eval", byte_run, "--seq-len", 64) == 2
    assert "seq_len=64 exceeds the model's max_seq_len=32" in capsys.readouterr().err
    assert mosa("eval", tmp_path / "nowhere") == 2
    assert "does not exist" in capsys.readouterr().err
    (byte_run / "checkpoints" / "step_00000002" / "model.safetensors").write_bytes(b"garbage")
    assert mosa("eval", byte_run) == 2
    assert "model.safetensors' is corrupt" in capsys.readouterr().err


def test_eval_reads_a_few_batches_by_default_and_the_whole_split_with_full(byte_run, mosa, capsys):
    capsys.readouterr()
    assert mosa("eval", byte_run, "--seq-len", 16, "--batch-size", 1, "--json") == 0
    default = json.loads(capsys.readouterr().out)
    assert default["windows"] == 8 < default["split_windows"]
    assert mosa("eval", byte_run, "--seq-len", 16, "--batch-size", 1, "--full", "--json") == 0
    full = json.loads(capsys.readouterr().out)
    assert full["windows"] == full["split_windows"] == default["split_windows"]
    assert mosa("eval", byte_run, "--seq-len", 16, "--batch-size", 1) == 0
    assert f"8 of {full['split_windows']:,} windows, --full for all" in capsys.readouterr().out


def test_pack_documents_trains_and_evaluates_documents_apart(tmp_path, mosa, capsys):
    """`mosa train --pack-documents` on a corpus of short documents records it in the run, and `mosa eval
    --pack-documents` evaluates with the documents of each window apart (another loss than across them)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i:02d}.txt").write_text(f"Note {i}: the {'abcdef'[i % 6] * (3 + i % 7)} end.\n")
    run = tmp_path / "run"
    assert mosa("train", "--out", run, "--steps", 2, "--data", corpus, "--tokenizer", "byte", "--pack-documents",
                "--attention", "mosa", "--sparsity", 4, *TINY) == 0
    assert json.loads((run / "config.json").read_text())["train"]["pack_documents"] is True
    capsys.readouterr()
    results = {}
    for flag in ([], ["--pack-documents"]):
        assert mosa("eval", run, "--split", "train", "--seq-len", 32, "--max-batches", 2, "--json", *flag) == 0
        result = json.loads(capsys.readouterr().out)
        results[result["pack_documents"]] = result["loss"]
    assert set(results) == {False, True} and results[True] != results[False]
