"""Tokenizers behind one small interface: bytes (no training), byte-level BPE (Hugging Face ``tokenizers``) and
the names of the synthetic recall task's ids.

Every tokenizer has ``encode``, ``encode_batch``, ``decode``, ``vocab_size``, ``eot_id`` (the end-of-text token
written after every document of a corpus) and ``save(dir)``; ``load_tokenizer(dir)`` reads any of them back
from ``tokenizer_meta.json`` (which kind) and, for BPE, ``tokenizer.json``.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .sources import DataError

EOT_TOKEN = "<|endoftext|>"
# The synthetic recall task's vocabulary (synthetic.py): end-of-text, filler, then keys and values.
EOT_ID = 0
FILLER_ID = 1
FIRST_KEY_ID = 2
FILLER_TOKEN = "_"
META_FILE = "tokenizer_meta.json"
BPE_FILE = "tokenizer.json"
# Long documents are encoded in pieces of about this many characters (see BPETokenizer.encode_batch).
_PIECE_CHARS = 10_000
# A cut before " " or "\n" that sits between two printable ASCII non-space characters is always a boundary of
# GPT-2's pre-tokenization regex (the word before ends there; the space joins the word after, a newline stands
# alone), so BPE, which never merges across pre-tokens, gives the same ids for the pieces as for the whole text.
# ASCII only because Python's \s and the tokenizer's differ on a few control characters.
_PIECE_BOUNDARY = re.compile(r"(?<=[!-~])(?=[ \n][!-~])")


class Tokenizer(ABC):
    """The interface the data pipeline, trainer and generation code rely on."""

    kind: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eot_id(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. Byte and BPE tokenizers encode ``EOT_TOKEN`` inside the text as plain text, never
        as ``eot_id``, which only the corpus pipeline inserts."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (a list, a numpy array or a 1-D tensor); ``eot_id`` is rendered as ``EOT_TOKEN``."""

    @abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Write the files ``load_tokenizer(directory)`` reads back."""

    def _write_meta(self, directory: str | os.PathLike, **extra) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id, **extra}
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def as_token_list(ids: Iterable[int]) -> list[int]:
    """``ids`` (a list, numpy array or tensor) as a list of Python ints."""
    # numpy arrays and tensors convert to Python ints in one call; iterating them would yield 0-d scalars.
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


class ByteTokenizer(Tokenizer):
    """The 256 byte values of the UTF-8 text plus one end-of-text token: vocab_size 257, eot_id 256."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eot_id(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        pieces, pending = [], bytearray()
        for token in as_token_list(ids):
            if token == self.eot_id:
                pieces.append(pending.decode("utf-8", errors="replace") + EOT_TOKEN)
                pending.clear()
            elif 0 <= token < 256:
                pending.append(token)
            else:
                raise ValueError(f"token id {token} is outside the byte vocabulary [0, {self.vocab_size})")
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def save(self, directory: str | os.PathLike) -> None:
        self._write_meta(directory)


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 pre-tokenization, so no unknown tokens) wrapping a ``tokenizers.Tokenizer``."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: HFTokenizer) -> None:
        eot_id = hf_tokenizer.token_to_id(EOT_TOKEN)
        if eot_id is None:
            raise DataError(f"the BPE tokenizer has no {EOT_TOKEN!r} token")
        # Literal "<|endoftext|>" in a document must stay text: only the pipeline inserts real EOT tokens.
        # The flag is not serialized by tokenizers, so it is set on every construction.
        hf_tokenizer.encode_special_tokens = True
        self._tokenizer = hf_tokenizer
        self._eot_id = eot_id
        pre_tokenizer = hf_tokenizer.pre_tokenizer
        self._cuts_into_pieces = (
            hf_tokenizer.normalizer is None
            and isinstance(pre_tokenizer, pre_tokenizers.ByteLevel)
            and pre_tokenizer.use_regex
            and not pre_tokenizer.add_prefix_space
        )
        # tokenizers >= 0.21 can skip computing offsets, which we never use.
        self._encode_many = getattr(hf_tokenizer, "encode_batch_fast", hf_tokenizer.encode_batch)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, encoded in parallel threads by tokenizers.

        Whole books encode several times slower than the same text in short pieces, and one long document would
        keep a single thread busy, so texts are cut at ``_PIECE_BOUNDARY`` (same ids) and the pieces encoded
        together.
        """
        if not self._cuts_into_pieces:
            return [encoding.ids for encoding in self._encode_many(list(texts), add_special_tokens=False)]
        pieces_per_text = [_cut_into_pieces(text) for text in texts]
        flat = [piece for pieces in pieces_per_text for piece in pieces]
        encodings = iter(self._encode_many(flat, add_special_tokens=False))
        ids_per_text = []
        for pieces in pieces_per_text:
            ids: list[int] = []
            for _ in pieces:
                ids.extend(next(encodings).ids)
            ids_per_text.append(ids)
        return ids_per_text

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(as_token_list(ids), skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        self._write_meta(directory, eot_token=EOT_TOKEN)
        self._tokenizer.save(str(Path(directory) / BPE_FILE))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        return cls(HFTokenizer.from_file(str(path)))


class SyntheticTokenizer(Tokenizer):
    """Names the ids of the synthetic recall task (synthetic.py): ``<|endoftext|>``, ``_``, keys ``k<i>``, values ``v<j>``; text is space-separated names."""

    kind = "synthetic"

    def __init__(self, vocab_size: int) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 4:
            raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 4 (end-of-text, filler, a key, a value)")
        self._vocab_size = vocab_size
        self.num_keys = (vocab_size - FIRST_KEY_ID) // 2
        self.first_value_id = FIRST_KEY_ID + self.num_keys
        self.num_values = vocab_size - self.first_value_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        return EOT_ID

    def encode(self, text: str) -> list[int]:
        return [self._id_of(name) for name in text.split()]

    def _id_of(self, name: str) -> int:
        if name == EOT_TOKEN:
            return EOT_ID
        if name == FILLER_TOKEN:
            return FILLER_ID
        kind, number = name[:1], name[1:]
        if number.isdigit():
            if kind == "k" and int(number) < self.num_keys:
                return FIRST_KEY_ID + int(number)
            if kind == "v" and int(number) < self.num_values:
                return self.first_value_id + int(number)
        raise ValueError(
            f"token {name!r} is not one of {EOT_TOKEN!r}, {FILLER_TOKEN!r}, k0..k{self.num_keys - 1}, "
            f"v0..v{self.num_values - 1}"
        )

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self._name_of(token) for token in as_token_list(ids))

    def _name_of(self, token: int) -> str:
        if token == EOT_ID:
            return EOT_TOKEN
        if token == FILLER_ID:
            return FILLER_TOKEN
        if FIRST_KEY_ID <= token < self.first_value_id:
            return f"k{token - FIRST_KEY_ID}"
        if self.first_value_id <= token < self._vocab_size:
            return f"v{token - self.first_value_id}"
        raise ValueError(f"token id {token} is outside the vocabulary [0, {self._vocab_size})")

    def save(self, directory: str | os.PathLike) -> None:
        self._write_meta(directory)


def _cut_into_pieces(text: str) -> list[str]:
    """``text`` cut at ``_PIECE_BOUNDARY`` points into pieces of about ``_PIECE_CHARS`` characters or more."""
    pieces, start = [], 0
    while len(text) - start > _PIECE_CHARS:
        boundary = _PIECE_BOUNDARY.search(text, start + _PIECE_CHARS)
        if boundary is None:
            break
        pieces.append(text[start : boundary.start()])
        start = boundary.start()
    pieces.append(text[start:])
    return pieces


def check_bpe_vocab_size(vocab_size: int) -> None:
    minimum = 256 + 1  # every byte symbol plus the end-of-text token
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= {minimum} (256 bytes + end-of-text)")


def train_bpe_tokenizer(
    documents: Iterable[str], vocab_size: int = 8000, *, show_progress: bool = False
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens (``EOT_TOKEN`` is id 0).

    The vocabulary is smaller than ``vocab_size`` when the documents hold too few distinct merges; read the
    result's ``vocab_size``.
    """
    check_bpe_vocab_size(vocab_size)
    hf_tokenizer = HFTokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    # Pieces cut at pre-token boundaries give the trainer the same word counts as whole documents, faster;
    # tokenizers buffers the iterator itself and pre-tokenizes in parallel.
    pieces = (piece for document in documents for piece in _cut_into_pieces(document))
    hf_tokenizer.train_from_iterator(pieces, trainer=trainer)
    return BPETokenizer(hf_tokenizer)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in ``directory`` by ``Tokenizer.save`` (any kind, including ``synthetic``)."""
    path = Path(directory)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DataError(f"tokenizer directory {str(path)!r} has no {META_FILE}")
    meta = json.loads(meta_path.read_text())
    kind = meta.get("kind")
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    if kind == BPETokenizer.kind:
        if not (path / BPE_FILE).is_file():
            raise DataError(f"tokenizer directory {str(path)!r} says kind 'bpe' but has no {BPE_FILE}")
        return BPETokenizer.from_file(path / BPE_FILE)
    if kind == SyntheticTokenizer.kind:
        return SyntheticTokenizer(meta["vocab_size"])
    raise DataError(f"{meta_path}: kind={kind!r} is not one of 'byte', 'bpe', 'synthetic'")
