"""Token shards on disk (nanoGPT style) and the loaders that read them.

A shard directory holds
  - ``train_000.bin``, ``train_001.bin``, ... and ``val_000.bin``, ...: raw token ids, uint16 when the vocabulary
    fits in 16 bits, else uint32; every document is followed by the tokenizer's end-of-text token. A split's
    shards read in order are one token stream.
  - ``meta.json``: the header (``dtype``, ``vocab_size``, ``eot_id``, ``tokenizer`` kind, ``source`` spec, ``seed``,
    ``num_docs`` and ``num_tokens`` per split, the shard files of each split). It is written last, so a directory
    with ``meta.json`` is complete.
  - the tokenizer files (``tokenizer_meta.json``, and ``tokenizer.json`` for BPE).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from torch_mosa.checks import check_positive_int

from .sources import HF_PREFIX, DataError, iter_documents
from .tokenizer import ByteTokenizer, Tokenizer, check_bpe_vocab_size, load_tokenizer, train_bpe_tokenizer

SPLITS = ("train", "val")
META_FILE = "meta.json"
FORMAT = "torch-mosa-shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000
# Characters handed to one encode_batch call: enough documents to keep the tokenizer's threads busy while the
# transient token lists stay around a few hundred MB.
_ENCODE_BATCH_CHARS = 8_000_000
_ENCODE_BATCH_DOCS = 1024


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardWriter:
    """Appends token arrays to ``{split}_{k:03d}.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, out_dir: str | os.PathLike, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        check_positive_int("shard_tokens", shard_tokens)
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []  # {"file", "num_tokens"} of every shard opened so far
        self._file = None

    @property
    def num_tokens(self) -> int:
        return sum(shard["num_tokens"] for shard in self.shards)

    def write(self, tokens: np.ndarray) -> None:
        """Append ``tokens`` [N], splitting them across shards where one fills up."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._file is None or self.shards[-1]["num_tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["num_tokens"]
            head, tokens = tokens[:room], tokens[room:]
            head.tofile(self._file)
            self.shards[-1]["num_tokens"] += int(head.size)

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = (self.out_dir / name).open("wb")
        self.shards.append({"file": name, "num_tokens": 0})

    def close(self) -> list[dict]:
        """Close the open shard and return the shard list for ``meta.json``."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return self.shards


def start_shard_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Create ``out_dir`` and clear what a previous (possibly interrupted) preparation left in it.

    Only this format's files are removed: ``meta.json``, ``train_*.bin``, ``val_*.bin`` and the tokenizer files.
    """
    path = Path(out_dir)
    if (path / META_FILE).exists() and not overwrite:
        raise DataError(
            f"out_dir {str(path)!r} already holds a prepared corpus ({META_FILE}); pass overwrite=True or choose "
            "another directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    stale = [path / META_FILE, path / "tokenizer.json", path / "tokenizer_meta.json"]
    stale += [p for split in SPLITS for p in path.glob(f"{split}_*.bin")]
    for file in stale:
        file.unlink(missing_ok=True)
    return path


def finish_shard_dir(
    out_dir: Path,
    writers: dict[str, ShardWriter],
    num_docs: dict[str, int],
    tokenizer: Tokenizer,
    **header,
) -> dict:
    """Close the writers, save the tokenizer and write ``meta.json`` last; returns the meta plus ``out_dir``."""
    shards = {split: writer.close() for split, writer in writers.items()}
    tokenizer.save(out_dir)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "tokenizer": tokenizer.kind,
        **header,
        "num_docs": dict(num_docs),
        "num_tokens": {split: sum(s["num_tokens"] for s in shards[split]) for split in SPLITS},
        "shards": shards,
    }
    temporary = out_dir / (META_FILE + ".tmp")
    temporary.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(temporary, out_dir / META_FILE)
    return {**meta, "out_dir": str(out_dir)}


def is_shard_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def prepare_corpus(
    spec: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    tokenizer: str | os.PathLike = "bpe",
    vocab_size: int = 8000,
    val_fraction: float = 0.05,
    val_docs: int | None = None,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    text_field: str = "text",
    max_docs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize the documents of ``spec`` (see ``iter_documents``) into train/val shards in ``out_dir``.

    tokenizer: ``"bpe"`` (trained on the train split with ``vocab_size``), ``"byte"``, or the directory of a
        saved tokenizer; the tokenizer used is saved beside the shards.
    val_fraction / val_docs: the validation split, in whole documents, chosen by a permutation seeded with
        ``seed``; ``val_docs`` (a count) overrides ``val_fraction``. With ``val_fraction > 0`` and at least two
        documents each split gets at least one document. A single document (with ``val_fraction > 0`` and no
        ``val_docs``) is cut in two instead, at its last line break before ``1 - val_fraction`` of its characters
        (at that character if no line break comes before): the head is train, the tail validation, and
        ``meta.json`` says ``"split": "document_tail"`` (else ``"documents"``).
    max_docs: read only the first ``max_docs`` documents (needed for huge streams such as ``hf:allenai/c4:en``,
        which are streamed once per pass: counting, BPE training, tokenizing).
    overwrite: replace a corpus already prepared in ``out_dir``.

    If ``spec`` is itself a prepared shard directory it is validated and returned as is (``out_dir`` unused).
    Returns the ``meta.json`` header plus ``out_dir``.
    """
    spec_str = os.fspath(spec)
    if not spec_str.startswith(HF_PREFIX) and is_shard_dir(spec_str):
        return validate_shard_dir(spec_str)
    if out_dir is None:
        raise ValueError(f"out_dir=None: a directory is needed to write the shards of {spec_str!r}")
    if not (0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    if val_docs is not None and (not isinstance(val_docs, int) or val_docs < 0):
        raise ValueError(f"val_docs={val_docs!r} must be None or an int >= 0")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0")
    if max_docs is not None:
        check_positive_int("max_docs", max_docs)
    check_positive_int("shard_tokens", shard_tokens)

    if tokenizer == "bpe":
        check_bpe_vocab_size(vocab_size)
        tok = None  # trained below, once the train split is known
    else:
        # Loaded before start_shard_dir, which clears tokenizer files that may be the ones named here.
        tok = _load_tokenizer_choice(tokenizer)
    out_path = start_shard_dir(out_dir, overwrite=overwrite)

    def documents() -> Iterator[str]:
        return islice(iter_documents(spec_str, text_field=text_field), max_docs)

    num_docs_total = sum(1 for _ in tqdm(documents(), desc="reading documents", unit="doc", disable=not progress))
    # One document (a single text file such as tinyshakespeare) leaves no document to validate on: its tail is
    # held out instead, as nanoGPT does.
    parts = (split_document_tail(next(documents()), val_fraction)
             if num_docs_total == 1 and val_fraction > 0 and val_docs is None else ())
    if len(parts) == 2:
        split, num_docs_total, is_val = "document_tail", 2, np.array([False, True])

        def documents() -> Iterator[str]:
            return iter(parts)

    else:
        split = "documents"
        is_val = split_documents(num_docs_total, val_fraction=val_fraction, val_docs=val_docs, seed=seed)
    if tok is None:
        train_docs = (doc for doc, val in zip(documents(), is_val) if not val)
        tok = train_bpe_tokenizer(train_docs, vocab_size, show_progress=progress)

    dtype = token_dtype(tok.vocab_size)
    writers = {split: ShardWriter(out_path, split, dtype, shard_tokens) for split in SPLITS}
    bar = tqdm(total=num_docs_total, desc="tokenizing", unit="doc", disable=not progress)
    for texts, val_flags in _document_batches(documents(), is_val):
        _write_batch(tok, texts, val_flags, writers)
        bar.update(len(texts))
        bar.set_postfix(tokens=writers["train"].num_tokens + writers["val"].num_tokens)
    bar.close()
    num_val = int(is_val.sum())
    return finish_shard_dir(
        out_path,
        writers,
        {"train": num_docs_total - num_val, "val": num_val},
        tok,
        source=spec_str,
        seed=seed,
        split=split,
        val_fraction=None if val_docs is not None else val_fraction,
        val_docs=val_docs,
    )


def split_document_tail(text: str, val_fraction: float) -> tuple[str, ...]:
    """``(head, tail)`` of ``text`` cut after its last line break before ``1 - val_fraction`` of its characters
    (at that character if none comes before), or ``(text,)`` when either part would hold nothing but whitespace."""
    cut = int((1.0 - val_fraction) * len(text))
    line_break = text.rfind("\n", 0, cut)
    if line_break >= 0:
        cut = line_break + 1
    head, tail = text[:cut], text[cut:]
    return (head, tail) if head.strip() and tail.strip() else (text,)


def split_documents(num_docs: int, *, val_fraction: float, val_docs: int | None, seed: int) -> np.ndarray:
    """A bool mask [num_docs], True for validation documents, drawn by a permutation seeded with ``seed``."""
    if val_docs is not None:
        if num_docs > 0 and val_docs >= num_docs:
            raise DataError(f"val_docs={val_docs} leaves no training document: the corpus has {num_docs}")
        num_val = val_docs
    elif val_fraction > 0 and num_docs >= 2:
        num_val = min(max(round(val_fraction * num_docs), 1), num_docs - 1)
    else:
        num_val = 0
    is_val = np.zeros(num_docs, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(num_docs)[:num_val]] = True
    return is_val


def _load_tokenizer_choice(choice: str | os.PathLike) -> Tokenizer:
    if choice == "byte":
        return ByteTokenizer()
    if Path(choice).is_dir():
        return load_tokenizer(choice)
    raise DataError(f"tokenizer={os.fspath(choice)!r} must be 'bpe', 'byte' or the directory of a saved tokenizer")


def _document_batches(documents: Iterator[str], is_val: np.ndarray) -> Iterator[tuple[list[str], list[bool]]]:
    """Documents grouped for one ``encode_batch`` call, with their validation flags."""
    texts, flags, num_chars = [], [], 0
    for text, val in zip(documents, is_val):
        texts.append(text)
        flags.append(bool(val))
        num_chars += len(text)
        if num_chars >= _ENCODE_BATCH_CHARS or len(texts) == _ENCODE_BATCH_DOCS:
            yield texts, flags
            texts, flags, num_chars = [], [], 0
    if texts:
        yield texts, flags


def _write_batch(tok: Tokenizer, texts: list[str], val_flags: list[bool], writers: dict[str, ShardWriter]) -> None:
    """Encode ``texts`` and append each document, then ``eot_id``, to its split in corpus order."""
    streams: dict[str, list[int]] = {split: [] for split in SPLITS}
    for ids, val in zip(tok.encode_batch(texts), val_flags):
        stream = streams["val" if val else "train"]
        stream.extend(ids)
        stream.append(tok.eot_id)
    for split, stream in streams.items():
        writers[split].write(np.array(stream, dtype=writers[split].dtype))


def read_meta(directory: str | os.PathLike) -> dict:
    """The ``meta.json`` of a shard directory, checked against the shard files' sizes (cheap, no token scan)."""
    path = Path(directory)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{str(path)!r} is not a shard directory: it has no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_path} is not valid JSON: {err.msg}") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{meta_path}: format={meta.get('format')!r} version={meta.get('version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    dtype = np.dtype(meta["dtype"])
    if dtype != token_dtype(meta["vocab_size"]):
        raise DataError(f"{meta_path}: dtype={meta['dtype']!r} does not match vocab_size={meta['vocab_size']}")
    for split in SPLITS:
        for shard in meta["shards"][split]:
            shard_path = path / shard["file"]
            if not shard_path.is_file():
                raise DataError(f"{meta_path} lists {shard['file']!r}, which is missing")
            expected = shard["num_tokens"] * dtype.itemsize
            if shard_path.stat().st_size != expected:
                raise DataError(
                    f"{shard_path} holds {shard_path.stat().st_size} bytes, {META_FILE} says {expected} "
                    f"({shard['num_tokens']} {dtype.name} tokens)"
                )
        if sum(s["num_tokens"] for s in meta["shards"][split]) != meta["num_tokens"][split]:
            raise DataError(f"{meta_path}: the {split} shards do not add up to num_tokens[{split!r}]")
    return meta


def validate_shard_dir(directory: str | os.PathLike) -> dict:
    """Check a shard directory fully (files, sizes, every token id < vocab_size, the tokenizer loads).

    Returns the meta plus ``out_dir``.
    """
    path = Path(directory)
    meta = read_meta(path)
    tok = load_tokenizer(path)
    if tok.vocab_size != meta["vocab_size"] or tok.eot_id != meta["eot_id"]:
        raise DataError(
            f"{path}: the saved tokenizer (vocab_size={tok.vocab_size}, eot_id={tok.eot_id}) does not match "
            f"{META_FILE} (vocab_size={meta['vocab_size']}, eot_id={meta['eot_id']})"
        )
    for split in SPLITS:
        for shard in meta["shards"][split]:
            tokens = np.memmap(path / shard["file"], dtype=meta["dtype"], mode="r")
            largest = int(tokens.max())
            if largest >= meta["vocab_size"]:
                raise DataError(f"{path / shard['file']} holds token id {largest} >= vocab_size={meta['vocab_size']}")
    return {**meta, "out_dir": str(path)}


class TokenDataset:
    """One split of a shard directory as a read-only memory-mapped token stream.

    Attributes: ``num_tokens``, ``vocab_size``, ``eot_id``, ``num_docs``, ``meta`` and ``tokenizer`` (loaded on
    first use).
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        self.directory = Path(directory)
        self.split = split
        self.meta = read_meta(self.directory)
        shards = self.meta["shards"][split]
        if not shards:
            raise DataError(
                f"split {split!r} of {str(self.directory)!r} is empty ({self.meta['num_docs'][split]} documents)"
            )
        self._arrays = [np.memmap(self.directory / s["file"], dtype=self.meta["dtype"], mode="r") for s in shards]
        self._starts = np.cumsum([0] + [a.size for a in self._arrays])
        self._tokenizer: Tokenizer | None = None

    @property
    def num_tokens(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eot_id(self) -> int:
        return self.meta["eot_id"]

    @property
    def num_docs(self) -> int:
        return self.meta["num_docs"][self.split]

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.directory)
        return self._tokenizer

    def end_of_text_positions(self) -> np.ndarray:
        """Positions [n] (int64, ascending) of the split's end-of-text tokens, each closing a document: the document
        of position p is ``np.searchsorted(positions, p)``."""
        positions = [np.flatnonzero(np.asarray(array) == self.eot_id) + int(start)
                     for array, start in zip(self._arrays, self._starts)]
        return np.concatenate(positions).astype(np.int64)

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [length] at positions ``start .. start + length - 1`` of the split, across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"window start={start} length={length} is outside [0, {self.num_tokens})")
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        offset = start - int(self._starts[shard])
        pieces = []
        while length > 0:
            piece = self._arrays[shard][offset : offset + length]
            pieces.append(piece)
            length -= piece.size
            shard, offset = shard + 1, 0
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _to_batch(dataset: TokenDataset, starts: list[int], seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and next-token targets y, int64 [len(starts), seq_len], from windows of seq_len + 1 tokens."""
    rows = torch.from_numpy(np.stack([dataset.window(s, seq_len + 1) for s in starts]).astype(np.int64))
    if device is not None and torch.device(device).type == "cuda":
        rows = rows.pin_memory().to(device, non_blocking=True)
    elif device is not None:
        rows = rows.to(device)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _check_batch_args(dataset: TokenDataset, batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    check_positive_int("batch_size", batch_size)
    check_positive_int("seq_len", seq_len)
    if seq_len + 1 > dataset.num_tokens:
        raise ValueError(
            f"seq_len={seq_len} needs windows of seq_len + 1 tokens, but the {dataset.split!r} split of "
            f"{str(dataset.directory)!r} holds only {dataset.num_tokens} tokens"
        )
    check_positive_int("world_size", world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an int in [0, world_size={world_size})")


class BatchLoader:
    """Endless random training batches ``(x, y)``, int64 [batch_size, seq_len], y = x shifted by one token.

    The sample stream is global: every step draws ``batch_size * world_size`` window starts from one
    ``torch.Generator`` seeded with ``seed`` and rank r takes starts ``[r * batch_size, (r + 1) * batch_size)``.
    So one process with batch B * W sees exactly the sequences of W processes with batch B, concatenated in rank
    order, and every rank's generator stays identical. ``state_dict`` / ``load_state_dict`` resume the stream
    exactly (same global batch size and seq_len).
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        _check_batch_args(dataset, batch_size, seq_len, rank, world_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        global_batch = self.batch_size * self.world_size
        # Windows of seq_len + 1 tokens start anywhere in [0, num_tokens - seq_len - 1].
        starts = torch.randint(0, self.dataset.num_tokens - self.seq_len, (global_batch,), generator=self.generator)
        self.step += 1
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _to_batch(self.dataset, mine.tolist(), self.seq_len, self.device)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "generator": self.generator.get_state(),
            "seed": self.seed,
            "global_batch_size": self.batch_size * self.world_size,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        global_batch = self.batch_size * self.world_size
        if state["global_batch_size"] != global_batch or state["seq_len"] != self.seq_len:
            raise ValueError(
                f"loader state has global_batch_size={state['global_batch_size']} seq_len={state['seq_len']}, "
                f"this loader has batch_size * world_size={global_batch} seq_len={self.seq_len}"
            )
        self.step = state["step"]
        self.generator.set_state(state["generator"])


def iter_eval_batches(
    dataset: TokenDataset,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic batches ``(x, y)``, int64 [<= batch_size, seq_len], covering the split once.

    Window i holds tokens ``[i * seq_len, (i + 1) * seq_len]`` (x is the first seq_len, y the last), so windows
    do not overlap in targets and together cover the split except a tail shorter than seq_len. Global batch g
    holds windows ``[g * B * W, (g + 1) * B * W)`` and rank r its r-th slice of B, as in ``BatchLoader``.
    ``max_batches`` caps the number of global batches. The last global batch may be short: some ranks then get
    a smaller batch or none, so sum losses and token counts across ranks; ``drop_last=True`` keeps only full
    global batches (every rank the same number of equal batches, e.g. for FSDP).
    """
    _check_batch_args(dataset, batch_size, seq_len, rank, world_size)
    if max_batches is not None:
        check_positive_int("max_batches", max_batches)
    num_windows = (dataset.num_tokens - 1) // seq_len
    global_batch = batch_size * world_size
    num_batches = num_windows // global_batch if drop_last else math.ceil(num_windows / global_batch)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for batch in range(num_batches):
        first = batch * global_batch + rank * batch_size
        windows = range(first, min(first + batch_size, num_windows))
        if not windows:
            return
        yield _to_batch(dataset, [w * seq_len for w in windows], seq_len, device)
