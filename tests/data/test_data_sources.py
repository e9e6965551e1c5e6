import io
import json
import socket
import tarfile
import time
from pathlib import Path

import pytest

from torch_mosa.data import DataError, iter_documents

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write_tar(path: Path, members: dict[str, bytes], mode: str) -> None:
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_txt_directory_is_recursive_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.txt").write_text("third ünïcode")
    (tmp_path / "notes.md").write_text("not a document")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "empty.txt").write_text("  \n")
    assert list(iter_documents(tmp_path)) == ["first", "second", "third ünïcode"]


def test_jsonl_reads_the_text_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "one", "id": 1}\n\n{"body": "two"}\n')
    assert list(iter_documents(path, text_field="body")) == ["one", "two"]
    with pytest.raises(DataError, match=r"docs.jsonl:1 has no text field 'text'"):
        list(iter_documents(path))


def test_parquet_reads_the_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "n": [1, 2, 3]}), path)
    assert list(iter_documents(path)) == ["alpha", "beta"]
    with pytest.raises(DataError, match="no text column 'content'"):
        list(iter_documents(path, text_field="content"))


@pytest.mark.parametrize("suffix, mode", [(".tar.xz", "w:xz"), (".tar.gz", "w:gz"), (".tar", "w")])
def test_tar_members_in_archive_order(tmp_path, suffix, mode):
    path = tmp_path / f"books{suffix}"
    members = {"z/last.txt": b"zulu", "a/first.txt": "álpha".encode(), "meta.json": b"{}"}
    write_tar(path, members, mode)
    assert list(iter_documents(path)) == ["zulu", "álpha"]


def test_glob_matches_several_formats(tmp_path):
    (tmp_path / "1.txt").write_text("one")
    (tmp_path / "2.jsonl").write_text(json.dumps({"text": "two"}) + "\n")
    (tmp_path / "3.txt").write_text("three")
    assert list(iter_documents(str(tmp_path / "*.txt"))) == ["one", "three"]
    assert list(iter_documents(str(tmp_path / "[12]*"))) == ["one", "two"]


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="matches no path"):
        list(iter_documents(str(tmp_path / "*.txt")))


def test_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="no file with a supported suffix"):
        list(iter_documents(tmp_path))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no documents"):
        list(iter_documents(tmp_path))


def test_binary_and_unsupported_files(tmp_path):
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(DataError, match="image.txt is not UTF-8 text"):
        list(iter_documents(binary))
    utf16 = tmp_path / "wide.txt"
    utf16.write_bytes("text".encode("utf-16-le"))
    with pytest.raises(DataError, match="wide.txt is not a text file"):
        list(iter_documents(utf16))
    other = tmp_path / "table.csv"
    other.write_text("a,b")
    with pytest.raises(DataError, match="unsupported suffix"):
        list(iter_documents(other))


def test_binary_member_of_an_archive_is_named(tmp_path):
    path = tmp_path / "books.tar.gz"
    write_tar(path, {"ok.txt": b"fine", "bad.txt": b"\xff\xfe\xfd"}, "w:gz")
    with pytest.raises(DataError, match=r"books.tar.gz:bad.txt is not UTF-8"):
        list(iter_documents(path))


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hf_offline_fails_fast(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    start = time.monotonic()
    with pytest.raises(DataError, match=rf"'hf:allenai/c4:en'.*{variable}"):
        list(iter_documents("hf:allenai/c4:en"))
    assert time.monotonic() - start < 1.0


def test_hf_unreachable_hub_fails_fast(monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as probe:  # a port nobody listens on: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"'hf:wikitext:wikitext-2-raw-v1'.*cannot be reached"):
        list(iter_documents("hf:wikitext:wikitext-2-raw-v1"))
    assert time.monotonic() - start < 4.0


def test_malformed_hf_spec():
    with pytest.raises(DataError, match="hf:NAME"):
        list(iter_documents("hf:"))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the repository")
def test_gutenberg_shard_streams_books_in_manifest_order():
    manifest = (SHARED_DATA / "gutenberg-lahiri" / "MANIFEST.tsv").read_text().splitlines()[1:]
    shard_00 = [line.split("\t") for line in manifest if line.startswith("00\t")]
    documents = iter_documents(SHARED_DATA / "gutenberg-lahiri" / "gutenberg-00.tar.xz")
    for (_, _, _, size), document in zip(shard_00[:2], documents):
        assert len(document.encode("utf-8")) == int(size)
