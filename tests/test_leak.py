"""The future-leak measurement (torch_mosa/leak.py): zero for dense attention and causal routing, non-zero for the
paper's top-k routing; replacement windows from another document or far away in the same one; `mosa leak`."""

import json

import numpy as np
import pytest
import torch

from torch_mosa import MoSAConfig, MoSALM
from torch_mosa.data.shards import TokenDataset, prepare_corpus
from torch_mosa.inference import calibrate_causal_thresholds
from torch_mosa.leak import FAR_WINDOWS, future_leak, leak_windows, loss_by_position

SEQ_LEN, CUT = 32, 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Eight documents of 600 to 1300 bytes: long enough for a far replacement inside each."""
    root = tmp_path_factory.mktemp("leak")
    rng = np.random.default_rng(0)
    for i in range(8):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "north", "south", "river", "stone"], 120 + 30 * i)
        (root / f"{i}.txt").write_text(f"Book {i}. " + " ".join(words) + "\n")
    prepare_corpus(str(root / "*.txt"), root / "data", tokenizer="byte", val_fraction=0.25, progress=False)
    return TokenDataset(root / "data", "train")


def model_for(attention, dataset):
    torch.manual_seed(0)
    config = MoSAConfig.from_preset("micro", attention=attention, sparsity=None if attention == "dense" else 4,
                                    vocab_size=dataset.vocab_size, num_layers=1, max_seq_len=SEQ_LEN)
    model = MoSALM(config).eval()
    if model.mosa_layers:
        calibrate_causal_thresholds(model, [torch.randint(0, dataset.vocab_size, (4, SEQ_LEN))])
    return model


@pytest.mark.parametrize("attention, routing", [("dense", "topk"), ("mosa", "causal")])
def test_no_leak_without_top_k_routing(shards, attention, routing):
    for replacement in ("other", "far"):
        result = future_leak(model_for(attention, shards), shards, SEQ_LEN, CUT, 12, replacement, routing)
        assert result["windows"] > 4
        assert result["mean_change"] == 0 and result["changed_share"] == 0 and result["interval"] == (0.0, 0.0)
        assert result["noise"] == 0


def test_top_k_routing_leaks(shards):
    result = future_leak(model_for("mosa", shards), shards, SEQ_LEN, CUT, 12, "other", "topk")
    assert result["changed_share"] > 0 and result["mean_abs_change"] > 0
    low, high = result["interval"]
    assert low <= result["mean_change"] <= high


def test_replacement_windows(shards):
    ends = shards.end_of_text_positions()
    assert len(ends) == shards.num_docs >= 5
    starts, sources = leak_windows(shards, SEQ_LEN, CUT, 20, "other")
    for start, source in zip(starts, sources):
        window_docs = set(np.searchsorted(ends, np.arange(start, start + SEQ_LEN + 1)))
        source_docs = set(np.searchsorted(ends, np.arange(source, source + SEQ_LEN - CUT)))
        assert not window_docs & source_docs
    starts, sources = leak_windows(shards, SEQ_LEN, CUT, 20, "far")
    assert len(starts) > 0
    for start, source in zip(starts, sources):
        assert abs(int(source) - int(start)) >= FAR_WINDOWS * (SEQ_LEN + 1) - (SEQ_LEN - CUT)
        docs = set(np.searchsorted(ends, np.arange(source, source + SEQ_LEN - CUT))) | \
            {int(np.searchsorted(ends, start + CUT))}
        assert len(docs) == 1


def test_loss_by_position(shards):
    losses = loss_by_position(model_for("dense", shards), shards, SEQ_LEN, 6)
    assert losses.shape == (SEQ_LEN,) and torch.isfinite(losses).all()


@pytest.mark.parametrize("call, match", [
    (lambda d: leak_windows(d, SEQ_LEN, SEQ_LEN, 4, "other"), "cut must be in"),
    (lambda d: leak_windows(d, SEQ_LEN, 8, 4, "near"), "replacement must be one of"),
    (lambda d: leak_windows(d, SEQ_LEN, 8, 0, "other"), "num_windows"),
])
def test_bad_arguments(shards, call, match):
    with pytest.raises(ValueError, match=match):
        call(shards)


def test_mosa_leak_command(tmp_path, shards, capsys):
    from torch_mosa import cli

    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--steps", "1", "--data", str(shards.directory), "--num-layers", "1",
                     "--hidden-size", "32", "--ffn-size", "64", "--head-dim", "8", "--max-seq-len", str(SEQ_LEN),
                     "--batch-size", "4", "--eval-batches", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["leak", str(run), "--split", "train", "--windows", "8", "--routing", "topk", "causal",
                     "--replacement", "other", "--calibrate-batches", "1", "--batch-size", "4", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["routing"] for row in rows] == ["topk", "causal"]
    assert rows[1]["mean_change"] == 0 and rows[0]["cut"] == SEQ_LEN // 2
    assert cli.main(["leak", str(run), "--split", "train", "--windows", "8", "--replacement", "far", "--routing",
                     "topk", "causal", "--by-position", "4"]) == 0
    out = capsys.readouterr().out
    assert "far away in the same document" in out and "topk - causal" in out
    assert len([line for line in out.splitlines() if line[:4].strip().isdigit()]) == 4  # four position spans
    assert cli.main(["leak", str(run), "--by-position", "-1"]) == 2
