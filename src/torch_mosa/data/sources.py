"""Documents (strings) from a data spec: a file, a directory, a glob, or a Hugging Face dataset.

A spec is one of
  - a file: ``.txt`` (one document), ``.jsonl`` (one document per line, in a text field), ``.parquet`` (a text
    column), or a tar archive (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.xz``, ``.tar.bz2``) whose ``.txt`` members
    are documents, read as a stream without extracting anything to disk;
  - a directory: every supported file below it, recursively (hidden files and folders skipped, other suffixes
    ignored);
  - a glob such as ``data/*.tar.xz`` (``**`` recurses);
  - ``hf:NAME[:CONFIG[:SPLIT]]``, e.g. ``hf:allenai/c4:en``: a Hugging Face dataset streamed through ``datasets``
    (split ``train`` by default).

Documents come in a deterministic order: files sorted by path, archive members and lines in stored order.
Documents with no non-whitespace character are skipped; a spec that yields none is an error.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + TAR_SUFFIXES

HF_PREFIX = "hf:"
_HF_CONNECT_TIMEOUT_S = 3.0
_PARQUET_BATCH_ROWS = 1024


class DataError(ValueError):
    """A data spec, file or prepared directory that cannot be used; the message names the path or spec."""


def iter_documents(spec: str | os.PathLike, *, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of ``spec`` in a deterministic order (see the module docstring for specs).

    ``text_field`` names the JSON field of ``.jsonl`` lines, the column of ``.parquet`` files and the feature of
    Hugging Face datasets. Raises ``DataError`` naming the path for a missing path, a non-UTF-8 (binary) file, a
    malformed line or column, or a spec that yields no non-empty document.
    """
    spec_str = os.fspath(spec)
    if spec_str.startswith(HF_PREFIX):
        raw = _iter_hf(spec_str, text_field)
    else:
        raw = (doc for path in resolve_paths(spec_str) for doc in _iter_file(path, text_field))
    num_docs = 0
    for doc in raw:
        if doc.strip():
            num_docs += 1
            yield doc
    if num_docs == 0:
        raise DataError(f"data spec {spec_str!r} holds no documents: every document found is empty")


def resolve_paths(spec: str | os.PathLike) -> list[Path]:
    """The supported files named by a file, directory or glob ``spec``, sorted by path.

    An explicit file must have a supported suffix; in directories and globs other files are ignored.
    """
    spec_str = os.fspath(spec)
    if glob.has_magic(spec_str):
        matches = sorted(Path(p) for p in glob.glob(spec_str, recursive=True))
        if not matches:
            raise DataError(f"data spec {spec_str!r}: the glob matches no path")
        paths = [p for m in matches for p in (_walk(m) if m.is_dir() else [m]) if _is_supported(p)]
        if not paths:
            raise DataError(
                f"data spec {spec_str!r}: the glob matches no file with a supported suffix "
                f"({', '.join(SUPPORTED_SUFFIXES)})"
            )
        return sorted(set(paths))
    path = Path(spec_str)
    if not path.exists():
        raise DataError(f"data path {spec_str!r} does not exist")
    if path.is_dir():
        paths = [p for p in _walk(path) if _is_supported(p)]
        if not paths:
            raise DataError(
                f"data directory {spec_str!r} holds no documents: no file with a supported suffix "
                f"({', '.join(SUPPORTED_SUFFIXES)})"
            )
        return paths
    if not _is_supported(path):
        raise DataError(
            f"data file {spec_str!r} has an unsupported suffix; allowed: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    return [path]


def _walk(root: Path) -> list[Path]:
    """Files below ``root`` sorted by relative path, skipping hidden files and folders (.git, checkpoints)."""
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append(path)
    return sorted(files)


def _is_supported(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        yield from _iter_tar(path)
    elif name.endswith(JSONL_SUFFIXES):
        yield from _iter_jsonl(path, text_field)
    elif name.endswith(PARQUET_SUFFIXES):
        yield from _iter_parquet(path, text_field)
    else:
        yield _decode_text(path.read_bytes(), str(path))


def _decode_text(data: bytes, where: str) -> str:
    # NUL bytes never occur in text but do in UTF-16 and binary files that happen to be valid UTF-8.
    if b"\x00" in data:
        raise DataError(f"{where} is not a text file: it contains NUL bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def _iter_tar(path: Path) -> Iterator[str]:
    # Stream mode ("r|*") reads members in stored order without seeking, so .tar.xz is decompressed once.
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if not (member.isfile() and member.name.lower().endswith(TEXT_SUFFIXES)):
                    continue
                stream = archive.extractfile(member)
                yield _decode_text(stream.read(), f"{path}:{member.name}")
    except tarfile.TarError as err:
        raise DataError(f"data archive {str(path)!r} cannot be read as a tar archive: {err}") from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as lines:
        for line_number, raw_line in enumerate(lines, start=1):
            where = f"{path}:{line_number}"
            line = _decode_text(raw_line, where).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where} is not valid JSON: {err.msg}") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{where} has no text field {text_field!r} (text_field); found: {keys}")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: field {text_field!r} holds {type(text).__name__}, expected a string"
                )
            yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {str(path)!r} needs pyarrow: pip install 'torch-mosa[hf]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise DataError(f"{str(path)!r} is not a readable parquet file: {err}") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path} has no text column {text_field!r} (text_field); columns: {schema.names}")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {text_field!r} has type {column_type}, expected string")
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """Split ``hf:NAME[:CONFIG[:SPLIT]]`` into (name, config or None, split, default ``train``)."""
    parts = spec[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or any(not part for part in parts):
        raise DataError(f"data spec {spec!r} is not of the form hf:NAME[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    return name, config, split


def _iter_hf(spec: str, text_field: str) -> Iterator[str]:
    name, config, split = parse_hf_spec(spec)
    _check_hf_online(spec)
    try:
        import datasets
    except ImportError:
        raise DataError(f"data spec {spec!r} needs the datasets library: pip install 'torch-mosa[hf]'") from None
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types; all mean "cannot load"
        raise DataError(f"data spec {spec!r} cannot be loaded: {type(err).__name__}: {err}") from err
    for record in stream:
        if text_field not in record:
            raise DataError(
                f"data spec {spec!r} has no text feature {text_field!r} (text_field); found: {sorted(record)}"
            )
        yield record[text_field]


def _check_hf_online(spec: str) -> None:
    """Fail fast instead of letting ``datasets`` retry for minutes when the Hub cannot be reached."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            raise DataError(f"data spec {spec!r} needs the Hugging Face Hub, but {variable} is set (offline)")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if not _can_connect(endpoint.hostname or "", port, _HF_CONNECT_TIMEOUT_S):
        raise DataError(
            f"data spec {spec!r} needs the Hugging Face Hub, but {endpoint.hostname}:{port} cannot be reached "
            f"within {_HF_CONNECT_TIMEOUT_S:.0f} s (offline?)"
        )


def _can_connect(host: str, port: int, timeout_s: float) -> bool:
    # The connect timeout does not cover DNS resolution, which can stall for much longer; a daemon thread
    # bounds the whole probe and is abandoned if it is still stuck.
    finished = threading.Event()
    reached = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            reached.append(True)
        except OSError:
            pass
        finally:
            finished.set()

    threading.Thread(target=probe, daemon=True).start()
    finished.wait(timeout_s)
    return bool(reached)
