import json





def test_prepare_trains_a_bpe_tokenizer_and_writes_shards(tmp_path, mosa, capsys, shared_data):
    data = shared_data / "gutenberg" / "0[14]_*.txt"
    assert mosa("prepare", data, "--out", tmp_path, "--vocab-size", 300) == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["num_docs"]) == ("bpe", 300, {"train": 1, "val": 1})
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "train_000.bin").is_file()
    assert "vocabulary 300" in capsys.readouterr().out


def test_prepare_refuses_to_overwrite_and_bad_paths(tmp_path, mosa, capsys, shared_data):
    text = shared_data / "gutenberg" / "12_us_constitution.txt"
    assert mosa("prepare", text, "--out", tmp_path, "--tokenizer", "byte") == 0
    assert mosa("prepare", text, "--out", tmp_path, "--tokenizer", "byte") == 2
    assert "already holds a prepared corpus" in capsys.readouterr().err
    assert mosa("prepare", tmp_path / "nothing.txt", "--out", tmp_path / "other") == 2
    assert "nothing.txt' does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text(" \n")
    assert mosa("prepare", tmp_path / "empty.txt", "--out", tmp_path / "new", "--tokenizer", "byte") == 2
    assert not (tmp_path / "new").exists() and not (tmp_path / "other").exists()  # no empty directory left


def test_prepare_holds_out_the_tail_of_a_single_document(tmp_path, mosa, shared_data):
    text = shared_data / "tinyshakespeare" / "input.txt"
    assert mosa("prepare", text, "--out", tmp_path, "--tokenizer", "byte") == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["split"], meta["num_docs"]) == ("document_tail", {"train": 1, "val": 1})
