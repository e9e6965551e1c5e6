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


def test_per_document_and_paired_comparison(tmp_path, mosa, capsys, shared_data):
    """--per-document reports every book of the split; --against evaluates a second run on the same windows and
    reports the paired difference (zero, with a zero interval, against itself)."""
    books, data = tmp_path / "text", tmp_path / "books"
    books.mkdir()
    for name in ("01_alice_in_wonderland", "04_hamlet", "12_us_constitution", "14_war_of_the_worlds"):
        (books / f"{name}.txt").write_bytes((shared_data / "gutenberg" / f"{name}.txt").read_bytes())
    assert mosa("prepare", books, "--out", data, "--tokenizer", "byte", "--val-fraction", "0.5") == 0
    runs = []
    for attention in ("dense", "mosa"):
        run = tmp_path / attention
        assert mosa("train", "--out", run, "--steps", 1, "--data", data, "--attention", attention,
                    *(["--sparsity", "4"] if attention == "mosa" else []), *TINY) == 0
        runs.append(run)
    capsys.readouterr()
    assert mosa("eval", runs[1], "--seq-len", 32, "--full", "--batch-size", 256, "--per-document",
                "--against", runs[0], "--json", "--no-progress") == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["per_document"]) == 2 and sum(r["windows"] for r in result["per_document"]) == result["windows"]
    assert all(r["label"] and r["difference"]["windows"] == r["windows"] for r in result["per_document"])
    assert result["against"]["windows"] == result["windows"] and result["against"]["mean_difference"] != 0
    assert mosa("eval", runs[0], "--seq-len", 16, "--max-batches", 2, "--against", runs[0]) == 0
    out = capsys.readouterr().out
    assert "loss +0.0000 nats/token, ppl ratio 1.0000 (95% interval 1.0000 .. 1.0000)" in out
