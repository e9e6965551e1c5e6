"""The run's data: its spec turned into a prepared shard directory (the built-in synthetic task, a shard directory
as is, or raw text prepared once into `<run>/data`, reused on resume and reruns of the same spec), and for the
synthetic task the trainer's loader and validation."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch_mosa.data.shards import is_shard_dir, prepare_corpus
from torch_mosa.data.sources import HF_PREFIX
from torch_mosa.data.synthetic import IGNORE_INDEX, SyntheticRecall
from torch_mosa.runs import DATA_DIR
from torch_mosa.train.distributed import DistInfo, barrier

REQUEST_FILE = "prepared_from.json"
SYNTHETIC_SOURCE = "synthetic:mqar"
# Key-value pairs per synthetic sequence, relative to its length: a quarter of the tokens hold pairs.
SYNTHETIC_PAIRS_PER_TOKEN = 1 / 8
# The default vocabulary: at least 32 ids (15 keys, 15 values), where the micro model learns recall within a
# minute on a CPU (docs/training.md; larger vocabularies take many more steps), and twice as many keys as pairs.
SYNTHETIC_MIN_VOCAB_SIZE = 32


def synthetic_task(seq_len: int, vocab_size: int | None, seed: int) -> SyntheticRecall:
    """The multi-query associative recall task of the default run: seq_len // 8 pairs, every key queried once.

    vocab_size None: max(32, 2 + 4 * pairs), so that keys are drawn from twice as many as a sequence holds.
    """
    num_pairs = max(1, int(seq_len * SYNTHETIC_PAIRS_PER_TOKEN))
    vocab_size = vocab_size or max(SYNTHETIC_MIN_VOCAB_SIZE, 2 + 4 * num_pairs)
    return SyntheticRecall(vocab_size=vocab_size, seq_len=seq_len, num_pairs=num_pairs, seed=seed)


def absolute_data_spec(spec: str | None) -> str | None:
    """The data spec with its path made absolute, as a run stores it: the run can then be resumed, evaluated and
    calibrated from any directory. Hugging Face specs and the synthetic task (None) are kept as they are."""
    if spec is None or str(spec).startswith(HF_PREFIX):
        return spec
    return os.path.abspath(spec)


def prepare_data(spec: str | None, run_dir: str | Path, *, tokenizer: str, vocab_size: int | None, seq_len: int,
                 seed: int, info: DistInfo = DistInfo(), progress: bool = True) -> Path:
    """The shard directory holding the run's data; rank 0 prepares it while the other ranks wait.

    spec None writes the synthetic MQAR task (sequences of `seq_len` tokens, `vocab_size` ids or the task's
    default); a shard directory is used in place; anything else is tokenized by `prepare_corpus` with `tokenizer`
    ('bpe' trains a `vocab_size` BPE on the training documents, 'byte' needs no training).
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


class RecallLoader:
    """Training micro-batches `(inputs, targets)` of the synthetic task, the `BatchLoader` interface for the trainer.

    Whole sequences from `SyntheticRecall.batches` with targets -100 except at the answers, so the model's loss
    is the recall loss alone. `batch_size` is per rank and micro-step; every optimizer step takes
    `grad_accum_steps` distinct micro-batches, its global batch being the task's batch of that step. The state is
    that step, saved between optimizer steps.
    """

    def __init__(self, task: SyntheticRecall, batch_size: int, *, grad_accum_steps: int = 1, rank: int = 0,
                 world_size: int = 1, device: torch.device | str | None = None):
        self.task, self.batch_size, self.grad_accum_steps = task, batch_size, grad_accum_steps
        self.rank, self.world_size, self.device = rank, world_size, device
        self.load_state_dict({"step": 0})

    def __iter__(self) -> "RecallLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self._batches)
        self._micro_steps += 1
        return batch.inputs.to(self.device), batch.targets.to(self.device)

    def state_dict(self) -> dict:
        return {"step": self._micro_steps // self.grad_accum_steps}

    def load_state_dict(self, state: dict) -> None:
        self._micro_steps = state["step"] * self.grad_accum_steps
        self._batches = self.task.batches(self.batch_size, start_step=state["step"], rank=self.rank,
                                          world_size=self.world_size, grad_accum_steps=self.grad_accum_steps)


@torch.no_grad()
def evaluate_recall(model: torch.nn.Module, task: SyntheticRecall, batch_size: int, num_batches: int, *,
                    grad_accum_steps: int = 1, rank: int = 0, world_size: int = 1,
                    device: torch.device | str = "cpu", autocast=contextlib.nullcontext(), routing: str = "topk") -> dict:
    """Answer loss and recall accuracy over the first `num_batches` global batches of the validation split.

    The batches are cut like training's (`RecallLoader`), so every rank runs the same number of forwards (as
    FSDP needs) and the result does not depend on the number of processes. Returns {loss, ppl, tokens,
    recall_accuracy}: the mean loss over answers, its exp, the number of answers and the share predicted right.
    routing: the model's routing ("topk" or "causal").
    """
    was_training = model.training
    model.eval()
    # [sum of answer losses in nats, number of answers, number of right answers]
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    batches = task.batches(batch_size, split="val", rank=rank, world_size=world_size,
                           grad_accum_steps=grad_accum_steps)
    for _ in range(num_batches * grad_accum_steps):
        batch = next(batches).to(device)
        with autocast:
            logits, _ = model(batch.inputs, routing=routing)
        logits = logits.float()
        totals[0] += F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").double()
        totals[1] += batch.answer_mask.sum()
        totals[2] += ((logits.argmax(dim=-1) == batch.targets) & batch.answer_mask).sum()
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    total_loss, answers, right = totals.tolist()
    loss = total_loss / answers
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(answers), "recall_accuracy": right / answers}
