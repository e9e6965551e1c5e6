from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from torch_mosa.data import BPETokenizer, ByteTokenizer, DataError, load_tokenizer, train_bpe_tokenizer
from torch_mosa.data.tokenizer import EOT_TOKEN

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
UNSEEN = "Zwölf Boxkämpfer jagen Viktor 🙂 — naïve café\ttabs\r\n<|endoftext|> stays text"


@pytest.fixture(scope="module")
def shakespeare() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data is not beside the repository")
    return SHAKESPEARE.read_text()[:200_000]


@pytest.fixture(scope="module")
def bpe(shakespeare) -> BPETokenizer:
    documents = shakespeare[:150_000].split("\n\n")
    return train_bpe_tokenizer(documents, vocab_size=600)


def test_byte_tokenizer_round_trip_and_eot(tmp_path):
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    ids = tok.encode(UNSEEN)
    assert max(ids) < 256 and tok.decode(ids) == UNSEEN
    assert tok.decode(tok.encode("a") + [tok.eot_id] + tok.encode("b")) == "a" + EOT_TOKEN + "b"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == UNSEEN
    assert tok.decode(torch.tensor(ids)) == UNSEEN
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_byte_tokenizer_decode_tolerates_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"
    with pytest.raises(ValueError, match="token id 300"):
        tok.decode([300])


def test_bpe_trains_to_the_vocab_size_and_round_trips_unseen_text(bpe):
    assert bpe.vocab_size == 600
    assert bpe.eot_id == 0
    ids = bpe.encode(UNSEEN)
    assert bpe.eot_id not in ids  # the literal end-of-text string is text, not the token
    assert bpe.decode(ids) == UNSEEN
    assert bpe.decode(ids + [bpe.eot_id]) == UNSEEN + EOT_TOKEN


def test_bpe_batch_and_long_texts_match_the_plain_library(bpe, shakespeare, tmp_path):
    bpe.save(tmp_path)
    plain = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    long_text = shakespeare  # far longer than one encoding piece
    texts = [long_text, "short", UNSEEN.replace(EOT_TOKEN, "")]
    assert bpe.encode_batch(texts) == [plain.encode(t, add_special_tokens=False).ids for t in texts]
    assert bpe.decode(bpe.encode(long_text)) == long_text


def test_bpe_save_and_load(bpe, tmp_path):
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert (loaded.vocab_size, loaded.eot_id) == (bpe.vocab_size, bpe.eot_id)
    assert loaded.encode(UNSEEN) == bpe.encode(UNSEEN)


def test_bpe_vocab_size_is_checked():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(["text"], vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer_meta.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(DataError, match="kind='sentencepiece'"):
        load_tokenizer(tmp_path)
