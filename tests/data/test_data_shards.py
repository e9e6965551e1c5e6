import json
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_mosa.data import (
    BatchLoader,
    DataError,
    TokenDataset,
    iter_eval_batches,
    prepare_corpus,
    validate_shard_dir,
)
from torch_mosa.data.tokenizer import EOT_TOKEN

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def make_corpus(directory: Path, num_docs: int = 24) -> list[str]:
    """num_docs small .txt documents, returned in the order the sources read them."""
    directory.mkdir(parents=True, exist_ok=True)
    line = "Document {i}: the quick brown fox jumps {n} times. Ünïcödé 🙂\n"
    documents = [line.format(i=i, n=i * 7) * (1 + i % 3) for i in range(num_docs)]
    for i, text in enumerate(documents):
        (directory / f"{i:03d}.txt").write_text(text)
    return documents


def split_documents(dataset: TokenDataset) -> list[str]:
    text = dataset.tokenizer.decode(dataset.window(0, dataset.num_tokens))
    assert text.endswith(EOT_TOKEN)
    return text.split(EOT_TOKEN)[:-1]


@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("byte_corpus")
    documents = make_corpus(root / "raw")
    summary = prepare_corpus(root / "raw", root / "shards", tokenizer="byte", val_fraction=0.25, progress=False)
    return documents, summary


def test_prepare_round_trip_byte(byte_corpus):
    documents, summary = byte_corpus
    assert summary["dtype"] == "uint16" and summary["tokenizer"] == "byte" and summary["vocab_size"] == 257
    assert summary["num_docs"] == {"train": 18, "val": 6}
    train = TokenDataset(summary["out_dir"], "train")
    val = TokenDataset(summary["out_dir"], "val")
    train_docs, val_docs = split_documents(train), split_documents(val)
    assert len(train_docs) == 18 and len(val_docs) == 6
    # Each split keeps corpus order, and together they hold every document once.
    assert train_docs == [d for d in documents if d in train_docs]
    assert sorted(train_docs + val_docs) == sorted(documents)
    assert train.num_tokens == summary["num_tokens"]["train"] == sum(len(d.encode()) + 1 for d in train_docs)
    assert validate_shard_dir(summary["out_dir"])["num_tokens"] == summary["num_tokens"]


def test_prepare_round_trip_bpe(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data is not beside the repository")
    text = SHAKESPEARE.read_text()[:60_000]
    (tmp_path / "raw").mkdir()
    documents = [text[i : i + 6_000] for i in range(0, len(text), 6_000)]
    for i, document in enumerate(documents):
        (tmp_path / "raw" / f"{i:02d}.txt").write_text(document)
    summary = prepare_corpus(tmp_path / "raw", tmp_path / "shards", vocab_size=400, val_docs=2, progress=False)
    assert summary["tokenizer"] == "bpe" and summary["vocab_size"] == 400 and summary["num_docs"]["val"] == 2
    assert (tmp_path / "shards" / "tokenizer.json").is_file()
    recovered = split_documents(TokenDataset(tmp_path / "shards", "train"))
    recovered += split_documents(TokenDataset(tmp_path / "shards", "val"))
    assert sorted(recovered) == sorted(documents)

    # A saved tokenizer directory is reused as is.
    again = prepare_corpus(tmp_path / "raw", tmp_path / "again", tokenizer=tmp_path / "shards", progress=False)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (tmp_path / "shards" / "tokenizer.json").read_text()
    assert again["num_tokens"]["train"] + again["num_tokens"]["val"] == sum(summary["num_tokens"].values())


def test_split_is_deterministic_by_seed(tmp_path, byte_corpus):
    documents, summary = byte_corpus
    raw = Path(summary["source"])
    same = prepare_corpus(raw, tmp_path / "same", tokenizer="byte", val_fraction=0.25, progress=False)
    other = prepare_corpus(raw, tmp_path / "other", tokenizer="byte", val_fraction=0.25, seed=1, progress=False)
    val_bytes = (Path(summary["out_dir"]) / "val_000.bin").read_bytes()
    assert (tmp_path / "same" / "val_000.bin").read_bytes() == val_bytes
    assert (tmp_path / "other" / "val_000.bin").read_bytes() != val_bytes
    assert other["num_docs"] == same["num_docs"]


def test_each_split_gets_a_document(tmp_path):
    make_corpus(tmp_path / "raw", num_docs=2)
    summary = prepare_corpus(tmp_path / "raw", tmp_path / "out", tokenizer="byte", val_fraction=0.01, progress=False)
    assert summary["num_docs"] == {"train": 1, "val": 1}
    with pytest.raises(DataError, match="val_docs=2 leaves no training document"):
        prepare_corpus(tmp_path / "raw", tmp_path / "out2", tokenizer="byte", val_docs=2, progress=False)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        prepare_corpus(tmp_path / "raw", tmp_path / "out3", tokenizer="byte", val_fraction=1.5, progress=False)


def test_a_single_document_is_cut_at_a_line_break_for_validation(tmp_path):
    (tmp_path / "one.txt").write_text("".join(f"line {i} of the only document\n" for i in range(20)))
    text = (tmp_path / "one.txt").read_text()
    summary = prepare_corpus(tmp_path / "one.txt", tmp_path / "out", tokenizer="byte", val_fraction=0.1,
                             progress=False)
    assert (summary["split"], summary["num_docs"]) == ("document_tail", {"train": 1, "val": 1})
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["split"] == "document_tail"
    head, tail = split_documents(TokenDataset(tmp_path / "out")), split_documents(TokenDataset(tmp_path / "out", "val"))
    # 90% of 600 characters is 540, inside line 18: the cut is at the line break before it, after line 17.
    assert head == ["".join(f"line {i} of the only document\n" for i in range(18))]
    assert tail == ["line 18 of the only document\nline 19 of the only document\n"]
    assert head[0] + tail[0] == text
    again = prepare_corpus(tmp_path / "one.txt", tmp_path / "again", tokenizer="byte", val_fraction=0.1, seed=3,
                           progress=False)
    assert again["num_tokens"] == summary["num_tokens"]  # the cut depends on the text alone, not the seed


def test_a_single_document_without_line_breaks_is_cut_at_the_fraction(tmp_path):
    (tmp_path / "one.txt").write_text("x" * 100)
    summary = prepare_corpus(tmp_path / "one.txt", tmp_path / "out", tokenizer="byte", val_fraction=0.2,
                             progress=False)
    assert summary["num_tokens"] == {"train": 80 + 1, "val": 20 + 1}  # each part followed by end-of-text
    kept = prepare_corpus(tmp_path / "one.txt", tmp_path / "kept", tokenizer="byte", val_fraction=0.0,
                          progress=False)
    assert (kept["split"], kept["num_docs"]) == ("documents", {"train": 1, "val": 0})


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare")
def test_tinyshakespeare_gets_a_validation_split(tmp_path):
    summary = prepare_corpus(SHAKESPEARE, tmp_path, tokenizer="byte", progress=False)
    assert summary["num_docs"] == {"train": 1, "val": 1}
    assert 0.04 < summary["num_tokens"]["val"] / sum(summary["num_tokens"].values()) < 0.06
    train = TokenDataset(tmp_path)
    assert train.tokenizer.decode(train.window(train.num_tokens - 2, 1)) == "\n"  # the head ends its last line


def test_empty_validation_split_is_reported(tmp_path):
    make_corpus(tmp_path / "raw", num_docs=3)
    prepare_corpus(tmp_path / "raw", tmp_path / "out", tokenizer="byte", val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="split 'val' .* is empty"):
        TokenDataset(tmp_path / "out", "val")
    with pytest.raises(ValueError, match="split='test'"):
        TokenDataset(tmp_path / "out", "test")


def test_several_shards_read_as_one_stream(tmp_path):
    make_corpus(tmp_path / "raw")
    summary = prepare_corpus(
        tmp_path / "raw", tmp_path / "out", tokenizer="byte", val_docs=1, shard_tokens=500, progress=False
    )
    shards = summary["shards"]["train"]
    assert len(shards) > 2 and all(s["num_tokens"] <= 500 for s in shards)
    stream = np.concatenate([np.fromfile(tmp_path / "out" / s["file"], dtype=np.uint16) for s in shards])
    dataset = TokenDataset(tmp_path / "out", "train")
    assert dataset.num_tokens == stream.size
    for start in (0, 480, 499, 500, 1234, stream.size - 40):
        np.testing.assert_array_equal(dataset.window(start, 40), stream[start : start + 40])


def test_prepared_directory_is_validated_not_rewritten(byte_corpus, tmp_path):
    _, summary = byte_corpus
    again = prepare_corpus(summary["out_dir"], tmp_path / "unused", progress=False)
    assert again == validate_shard_dir(summary["out_dir"])
    assert not (tmp_path / "unused").exists()


def test_existing_output_needs_overwrite(tmp_path):
    make_corpus(tmp_path / "raw", num_docs=4)
    prepare_corpus(tmp_path / "raw", tmp_path / "out", tokenizer="byte", progress=False)
    with pytest.raises(DataError, match="overwrite=True"):
        prepare_corpus(tmp_path / "raw", tmp_path / "out", tokenizer="byte", progress=False)
    summary = prepare_corpus(tmp_path / "raw", tmp_path / "out", tokenizer="byte", overwrite=True, progress=False)
    assert validate_shard_dir(tmp_path / "out")["num_tokens"] == summary["num_tokens"]


def test_validation_catches_damage(tmp_path):
    make_corpus(tmp_path / "raw", num_docs=4)
    prepare_corpus(tmp_path / "raw", tmp_path / "out", tokenizer="byte", progress=False)
    shard = tmp_path / "out" / "train_000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[3] = 300  # beyond the byte vocabulary
    tokens.tofile(shard)
    with pytest.raises(DataError, match="token id 300 >= vocab_size=257"):
        validate_shard_dir(tmp_path / "out")
    tokens[:-1].tofile(shard)
    with pytest.raises(DataError, match="train_000.bin holds"):
        TokenDataset(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    meta["dtype"] = "uint32"
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="dtype='uint32' does not match vocab_size=257"):
        TokenDataset(tmp_path / "out")


def test_batch_loader_batches_are_shifted_windows(byte_corpus):
    _, summary = byte_corpus
    dataset = TokenDataset(summary["out_dir"])
    stream = dataset.window(0, dataset.num_tokens).astype(np.int64)
    x, y = next(BatchLoader(dataset, batch_size=4, seq_len=16, seed=3))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        starts = [s for s in range(dataset.num_tokens - 16) if np.array_equal(stream[s : s + 16], row_x)]
        assert any(np.array_equal(stream[s + 1 : s + 17], row_y) for s in starts)


def test_batch_loader_is_deterministic_and_resumes_exactly(byte_corpus):
    dataset = TokenDataset(byte_corpus[1]["out_dir"])
    first = BatchLoader(dataset, batch_size=3, seq_len=8, seed=7)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(4)]

    resumed = BatchLoader(dataset, batch_size=3, seq_len=8, seed=123)
    resumed.load_state_dict(state)
    assert resumed.step == 5
    for (x, y), (ex, ey) in zip((next(resumed) for _ in range(4)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)

    fresh = BatchLoader(dataset, batch_size=3, seq_len=8, seed=7)
    assert torch.equal(next(fresh)[0], next(BatchLoader(dataset, batch_size=3, seq_len=8, seed=7))[0])
    with pytest.raises(ValueError, match="global_batch_size=3"):
        BatchLoader(dataset, batch_size=2, seq_len=8).load_state_dict(state)


def test_batch_loader_rank_slices_concatenate_to_the_single_process_batch(byte_corpus):
    dataset = TokenDataset(byte_corpus[1]["out_dir"])
    single = BatchLoader(dataset, batch_size=6, seq_len=10, seed=5)
    ranks = [BatchLoader(dataset, batch_size=3, seq_len=10, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, y = next(single)
        parts = [next(loader) for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


def test_batch_loader_argument_errors(byte_corpus):
    dataset = TokenDataset(byte_corpus[1]["out_dir"], "val")
    with pytest.raises(ValueError, match=f"seq_len={dataset.num_tokens}"):
        BatchLoader(dataset, batch_size=1, seq_len=dataset.num_tokens)
    with pytest.raises(ValueError, match="rank=2"):
        BatchLoader(dataset, batch_size=1, seq_len=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        BatchLoader(dataset, batch_size=0, seq_len=4)


def test_eval_batches_cover_the_split_in_order(byte_corpus):
    dataset = TokenDataset(byte_corpus[1]["out_dir"], "val")
    seq_len = 32
    batches = list(iter_eval_batches(dataset, batch_size=5, seq_len=seq_len))
    x = torch.cat([b[0] for b in batches]).numpy()
    y = torch.cat([b[1] for b in batches]).numpy()
    num_windows = (dataset.num_tokens - 1) // seq_len
    stream = dataset.window(0, dataset.num_tokens).astype(np.int64)
    np.testing.assert_array_equal(x.ravel(), stream[: num_windows * seq_len])
    np.testing.assert_array_equal(y.ravel(), stream[1 : num_windows * seq_len + 1])
    assert len(list(iter_eval_batches(dataset, batch_size=5, seq_len=seq_len, max_batches=2))) == 2


def test_eval_batches_rank_slices_concatenate_to_the_single_process_batch(byte_corpus):
    dataset = TokenDataset(byte_corpus[1]["out_dir"], "val")
    single = list(iter_eval_batches(dataset, batch_size=4, seq_len=16))
    ranks = [list(iter_eval_batches(dataset, batch_size=2, seq_len=16, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) >= len(ranks[1])
    for step, (x, y) in enumerate(single):
        parts = [batches[step] for batches in ranks if step < len(batches)]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
    full = list(iter_eval_batches(dataset, batch_size=2, seq_len=16, rank=1, world_size=2, drop_last=True))
    assert all(x.shape == (2, 16) for x, _ in full)
