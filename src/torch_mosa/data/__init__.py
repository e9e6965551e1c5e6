"""Data: document sources, tokenizers, memory-mapped token shards and their loaders, the synthetic MQAR task."""

from .shards import (
    BatchLoader,
    TokenDataset,
    iter_eval_batches,
    prepare_corpus,
    read_meta,
    validate_shard_dir,
)
from .sources import DataError, iter_documents
from .synthetic import RecallBatch, SyntheticRecall, SyntheticTokenizer, recall_accuracy
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "BPETokenizer",
    "BatchLoader",
    "ByteTokenizer",
    "DataError",
    "RecallBatch",
    "SyntheticRecall",
    "SyntheticTokenizer",
    "TokenDataset",
    "Tokenizer",
    "iter_documents",
    "iter_eval_batches",
    "load_tokenizer",
    "prepare_corpus",
    "read_meta",
    "recall_accuracy",
    "train_bpe_tokenizer",
    "validate_shard_dir",
]
