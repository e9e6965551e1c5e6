"""Multi-query associative recall (MQAR, from Zoology / Based), the built-in offline dataset.

Vocabulary of ``vocab_size`` V ids (``SyntheticTokenizer`` names them):
    0                 ``<|endoftext|>``, written after every sequence in shards
    1                 ``_``, filler between queries
    2 .. 2+K-1        keys ``k0 .. k{K-1}``, K = (V - 2) // 2
    2+K .. V-1        values ``v0 .. v{V-3-K}``

One example is ``seq_len + 1`` tokens: ``num_pairs`` key-value pairs (distinct keys, random values), then a
query region cut into 2-token slots where ``num_queries`` of the keys reappear, each followed by its value, at
random slots, with ``_`` elsewhere::

    k12 v7 k3 v40 k9 v7 | _ _ k3 v40 _ _ _ _ k12 v7 _

Batches (``RecallBatch``): ``inputs`` = tokens[:, :-1], ``targets`` = tokens[:, 1:] with -100 (ignored by
``cross_entropy``) everywhere except the answer positions, the positions of a queried key, whose target is its
value; ``answer_mask`` marks them and ``recall_accuracy`` scores only them.

Shards (``write_shards``) store a sample of sequences as tokens only (for inspection and ``mosa eval``); the
trainer recognizes them by their ``meta.json`` (``recall_task``) and trains on whole sequences from ``batches``
with the loss on the answers alone, since random windows of the token stream would cut queries off their pairs.

Everything is a deterministic function of (seed, split, step): batch ``step`` of a split never depends on what was
drawn before, so resuming only needs the step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from torch_mosa.checks import check_positive_int

from .shards import (
    DEFAULT_SHARD_TOKENS,
    SPLITS,
    ShardWriter,
    finish_shard_dir,
    start_shard_dir,
    token_dtype,
)
from .tokenizer import EOT_ID, FILLER_ID, FIRST_KEY_ID, SyntheticTokenizer

IGNORE_INDEX = -100
_SHARD_CHUNK_SEQUENCES = 1024


@dataclass(frozen=True, eq=False)
class RecallBatch:
    """inputs, targets: int64 [B, T]; answer_mask: bool [B, T]. targets is -100 where answer_mask is False."""

    inputs: torch.Tensor
    targets: torch.Tensor
    answer_mask: torch.Tensor

    def to(self, device: torch.device | str) -> RecallBatch:
        return RecallBatch(self.inputs.to(device), self.targets.to(device), self.answer_mask.to(device))


class SyntheticRecall:
    """The MQAR task (see the module docstring) with its vocabulary, batches and shard writer.

    num_queries: how many of the keys are queried per sequence; by default all ``num_pairs`` if the query region
    has room, else as many as it has slots.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        seq_len: int = 256,
        num_pairs: int = 32,
        seed: int = 0,
        num_queries: int | None = None,
    ) -> None:
        self.tokenizer = SyntheticTokenizer(vocab_size)
        check_positive_int("seq_len", seq_len)
        check_positive_int("num_pairs", num_pairs)
        if num_pairs > self.tokenizer.num_keys:
            raise ValueError(
                f"num_pairs={num_pairs} needs that many distinct keys; vocab_size={vocab_size} has "
                f"{self.tokenizer.num_keys}"
            )
        # seq_len + 1 tokens hold the pairs, then 2-token query slots.
        self.num_slots = (seq_len + 1 - 2 * num_pairs) // 2
        if self.num_slots < 1:
            raise ValueError(
                f"seq_len={seq_len} leaves no room for a query after num_pairs={num_pairs} pairs; "
                f"seq_len must be >= 2 * num_pairs + 1 = {2 * num_pairs + 1}"
            )
        most_queries = min(num_pairs, self.num_slots)
        if num_queries is None:
            num_queries = most_queries
        elif not isinstance(num_queries, int) or not 1 <= num_queries <= most_queries:
            raise ValueError(f"num_queries={num_queries!r} must be an int in [1, {most_queries}]")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an int >= 0")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.num_pairs = num_pairs
        self.num_queries = num_queries
        self.seed = seed

    def _generator(self, split: str, step: int) -> torch.Generator:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be an int >= 0")
        # SeedSequence mixes (seed, split, step) into independent streams; consecutive seeds share nothing.
        state = np.random.SeedSequence([self.seed, SPLITS.index(split), step]).generate_state(1, dtype=np.uint64)
        return torch.Generator().manual_seed(int(state[0]))

    def sequences(self, count: int, step: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Examples number ``step`` of ``split``: tokens int64 [count, seq_len + 1] and answer_mask bool
        [count, seq_len] (True at the input positions of queried keys)."""
        check_positive_int("count", count)
        generator = self._generator(split, step)
        tok, pairs, queries = self.tokenizer, self.num_pairs, self.num_queries
        # topk of uniform noise: a uniformly random ordered subset, i.e. distinct keys, slots and queried pairs.
        keys = torch.rand(count, tok.num_keys, generator=generator).topk(pairs, dim=1).indices + FIRST_KEY_ID
        values = torch.randint(tok.num_values, (count, pairs), generator=generator) + tok.first_value_id
        slots = torch.rand(count, self.num_slots, generator=generator).topk(queries, dim=1).indices
        queried = torch.rand(count, pairs, generator=generator).topk(queries, dim=1).indices

        tokens = torch.full((count, self.seq_len + 1), FILLER_ID, dtype=torch.int64)
        tokens[:, 0 : 2 * pairs : 2] = keys
        tokens[:, 1 : 2 * pairs : 2] = values
        key_positions = 2 * pairs + 2 * slots  # [count, queries]
        tokens.scatter_(1, key_positions, keys.gather(1, queried))
        tokens.scatter_(1, key_positions + 1, values.gather(1, queried))
        answer_mask = torch.zeros(count, self.seq_len, dtype=torch.bool)
        answer_mask.scatter_(1, key_positions, True)
        return tokens, answer_mask

    def get_batch(self, batch_size: int, step: int = 0, split: str = "train") -> RecallBatch:
        """Batch ``step`` of ``split`` (see ``RecallBatch``), the same for every call with these arguments."""
        tokens, answer_mask = self.sequences(batch_size, step, split)
        targets = tokens[:, 1:].masked_fill(~answer_mask, IGNORE_INDEX)
        return RecallBatch(tokens[:, :-1].contiguous(), targets, answer_mask)

    def batches(
        self,
        batch_size: int,
        *,
        split: str = "train",
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        grad_accum_steps: int = 1,
    ) -> Iterator[RecallBatch]:
        """Endless micro-batches of ``batch_size`` examples, ``grad_accum_steps`` per step, from ``start_step`` on.

        Step s is one global batch, ``get_batch(batch_size * world_size * grad_accum_steps, s)``, cut into equal
        parts: micro-step m of rank r gets part ``m * world_size + r``. A step's examples are thus the same however
        they are spread over processes and micro-steps (as in ``BatchLoader``, one process with the same global
        batch sees them all), and resuming needs only the step.
        """
        check_positive_int("world_size", world_size)
        check_positive_int("grad_accum_steps", grad_accum_steps)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} must be an int in [0, world_size={world_size})")
        step = start_step
        while True:
            batch = self.get_batch(batch_size * world_size * grad_accum_steps, step, split)
            for micro_step in range(grad_accum_steps):
                part = micro_step * world_size + rank
                rows = slice(part * batch_size, (part + 1) * batch_size)
                yield RecallBatch(batch.inputs[rows], batch.targets[rows], batch.answer_mask[rows])
            step += 1

    def write_shards(
        self,
        out_dir: str | os.PathLike,
        num_train_sequences: int = 20_000,
        num_val_sequences: int = 1_000,
        *,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        overwrite: bool = False,
        progress: bool = True,
    ) -> dict:
        """Write sequences as documents (each followed by ``<|endoftext|>``) in the ``prepare_corpus`` format.

        Returns the ``meta.json`` header plus ``out_dir``; its ``tokenizer`` is ``"synthetic"``.
        """
        counts = {"train": num_train_sequences, "val": num_val_sequences}
        for split, count in counts.items():
            check_positive_int(f"num_{split}_sequences", count)
        out_path = start_shard_dir(out_dir, overwrite=overwrite)
        dtype = token_dtype(self.vocab_size)
        writers = {split: ShardWriter(out_path, split, dtype, shard_tokens) for split in SPLITS}
        bar = tqdm(total=sum(counts.values()), desc="writing MQAR", unit="seq", disable=not progress)
        for split, count in counts.items():
            for chunk, first in enumerate(range(0, count, _SHARD_CHUNK_SEQUENCES)):
                size = min(_SHARD_CHUNK_SEQUENCES, count - first)
                tokens, _ = self.sequences(size, step=chunk, split=split)
                documents = torch.cat([tokens, torch.full((size, 1), EOT_ID)], dim=1)
                writers[split].write(documents.numpy().astype(dtype).ravel())
                bar.update(size)
        bar.close()
        task = {
            "task": "mqar",
            "seq_len": self.seq_len,
            "num_pairs": self.num_pairs,
            "num_queries": self.num_queries,
        }
        return finish_shard_dir(
            out_path, writers, counts, self.tokenizer, source="synthetic:mqar", seed=self.seed, synthetic=task
        )


def recall_accuracy(logits: torch.Tensor, batch: RecallBatch) -> float:
    """Fraction of answer positions where the argmax of ``logits`` [B, T, V] is the queried key's value."""
    if logits.shape[:2] != batch.answer_mask.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match the batch's [B, T] = {tuple(batch.answer_mask.shape)}"
        )
    answer_mask = batch.answer_mask.to(logits.device)
    correct = (logits.argmax(dim=-1) == batch.targets.to(logits.device)) & answer_mask
    return correct.sum().item() / answer_mask.sum().item()


def recall_task(meta: dict) -> SyntheticRecall | None:
    """The task that wrote a shard directory, from its ``meta.json`` header; None for any other data."""
    task = meta.get("synthetic")
    if task is None:
        return None
    return SyntheticRecall(
        vocab_size=meta["vocab_size"],
        seq_len=task["seq_len"],
        num_pairs=task["num_pairs"],
        num_queries=task["num_queries"],
        seed=meta["seed"],
    )
