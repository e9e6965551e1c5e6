"""Turn a run's data spec into a prepared shard directory: the built-in synthetic task, a shard directory as is,
or raw text prepared once into `<run>/data` (reused on resume and reruns of the same spec)."""

from __future__ import annotations

import json
from pathlib import Path

from torch_mosa.data.shards import is_shard_dir, prepare_corpus
from torch_mosa.data.synthetic import SyntheticRecall
from torch_mosa.train.distributed import DistInfo, barrier

DATA_DIR = "data"
REQUEST_FILE = "prepared_from.json"
SYNTHETIC_SOURCE = "synthetic:mqar"
# Key-value pairs per synthetic sequence, relative to its length: a quarter of the tokens hold pairs.
SYNTHETIC_PAIRS_PER_TOKEN = 1 / 8


def synthetic_task(seq_len: int, vocab_size: int, seed: int) -> SyntheticRecall:
    """The multi-query associative recall task of the default run: seq_len // 8 pairs, every key queried once."""
    num_pairs = max(1, int(seq_len * SYNTHETIC_PAIRS_PER_TOKEN))
    return SyntheticRecall(vocab_size=vocab_size, seq_len=seq_len, num_pairs=num_pairs, seed=seed)


def prepare_data(spec: str | None, run_dir: str | Path, *, tokenizer: str, vocab_size: int, seq_len: int, seed: int,
                 info: DistInfo = DistInfo(), progress: bool = True) -> Path:
    """The shard directory holding the run's data; rank 0 prepares it while the other ranks wait.

    spec None writes the synthetic MQAR task (sequences of `seq_len` tokens, `vocab_size` ids); a shard directory
    is used in place; anything else is tokenized by `prepare_corpus` with `tokenizer` ('bpe' trains a
    `vocab_size` BPE on the training documents, 'byte' needs no training).
    """
    if spec is not None and is_shard_dir(spec):
        return Path(spec)
    data_dir = Path(run_dir) / DATA_DIR
    # What the directory was prepared from: reused only for the very same request (resume, rerun).
    request = {"source": SYNTHETIC_SOURCE if spec is None else str(spec),
               "tokenizer": "synthetic" if spec is None else tokenizer, "vocab_size": vocab_size, "seed": seed,
               "seq_len": seq_len if spec is None else None}
    marker = data_dir / REQUEST_FILE
    if info.is_main and not (is_shard_dir(data_dir) and marker.is_file() and json.loads(marker.read_text()) == request):
        marker.unlink(missing_ok=True)
        if spec is None:
            synthetic_task(seq_len, vocab_size, seed).write_shards(data_dir, overwrite=True, progress=progress)
        else:
            prepare_corpus(spec, data_dir, tokenizer=tokenizer, vocab_size=vocab_size, seed=seed, overwrite=True,
                           progress=progress)
        marker.write_text(json.dumps(request) + "\n")
    barrier(info)
    return data_dir
