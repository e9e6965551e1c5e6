"""TrainConfig: every knob of a training run, with the paper's defaults (SPEC §4)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch_mosa.checks import ROUTING_MODES, check_positive_int, dataclass_from_dict

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
STRATEGIES = ("ddp", "fsdp")
BPE_VOCAB_SIZE = 8000


@dataclass
class TrainConfig:
    """One training run. Batch sizes are GLOBAL: `batch_size` sequences per optimizer step, across every rank and
    micro-step, so a run resumes unchanged on another number of processes.

    data: None (the built-in synthetic associative-recall task), a prepared shard directory, or a raw spec (text
    files, directories, globs, tar archives, hf:NAME[:CONFIG[:SPLIT]]) prepared once into `<run>/data` with
    `tokenizer` (bpe | byte). The model's vocab_size is always the data's.
    vocab_size: the vocabulary to prepare: BPE target size (None: the paper's 8000) or the synthetic task's
    (None: the task's default for seq_len, see `synthetic_task`); unused for byte-level data and prepared shard
    directories.
    seq_len: tokens per training sequence; None takes the model's max_seq_len.
    Schedule: linear warmup over min(warmup_steps, warmup_fraction * steps) steps, then cosine decay from lr to
    min_lr_ratio * lr at the last step.
    dtype: auto = bfloat16 autocast on CUDA, float32 on CPU.
    checkpoint_interval: steps between checkpoints (0 = only at the end); keep_checkpoints: how many to keep.
    eval_interval: steps between validations (0 = only at the end); eval_batches: global batches per validation.
    routing: "topk" (the paper's expert-choice routing, non-causal) or "causal" (causal training, issue 11: route
    with the per-token threshold rule that generation uses, validate with it too; see torch_mosa.train.causal):
    each MoSA head keeps at most ceil(causal_capacity_factor x k) tokens per sequence (None: no limit, the forward
    runs at width T) and its threshold is an EMA with momentum `threshold_momentum` of the batches' top-k thresholds
    (0.9: 0.99 lagged behind the moving router logits in a 250-step run, docs/causal_inference.md).
    pack_documents: keep the documents of each training and validation window apart (a window cuts across the
    corpus's documents, which end with the end-of-text token): attention and routing stay inside a document, each
    routes on its own and RoPE positions restart (ops/documents.py). Text corpora only; the synthetic task's
    sequences are single documents.
    """

    data: str | None = None
    tokenizer: str = "bpe"
    vocab_size: int | None = None
    steps: int = 1000
    batch_size: int = 64
    seq_len: int | None = None
    grad_accum_steps: int = 1
    lr: float = 2.5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 4000
    warmup_fraction: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.25
    eval_interval: int = 200
    eval_batches: int = 20
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3
    log_interval: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    strategy: str = "ddp"
    tensorboard: bool = True
    progress: bool = True
    routing: str = "topk"
    causal_capacity_factor: float | None = 2.0
    threshold_momentum: float = 0.9
    pack_documents: bool = False

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "grad_accum_steps", "eval_batches", "keep_checkpoints", "log_interval"):
            check_positive_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "seed"):
            check_positive_int(name, getattr(self, name), minimum=0)
        if self.seq_len is not None:
            check_positive_int("seq_len", self.seq_len, minimum=1)
        if self.vocab_size is not None:
            check_positive_int("vocab_size", self.vocab_size, minimum=4)
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by grad_accum_steps={self.grad_accum_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip!r}")
        if self.tokenizer not in ("bpe", "byte"):
            raise ValueError(f"tokenizer must be 'bpe' or 'byte', got {self.tokenizer!r}")
        if self.causal_capacity_factor is not None and not (math.isfinite(self.causal_capacity_factor)
                                                             and self.causal_capacity_factor >= 1.0):
            raise ValueError(f"causal_capacity_factor must be a number >= 1 (capacity = factor x k) or None (no "
                             f"capacity), got {self.causal_capacity_factor!r}")
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum!r}")
        for name, allowed in (("device", DEVICES), ("dtype", DTYPES), ("strategy", STRATEGIES),
                              ("routing", ROUTING_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def data_vocab_size(self) -> int | None:
        """vocab_size, or its default for the kind of data: 8000 for BPE as in the paper, None for the synthetic
        task, whose default depends on its sequence length."""
        if self.vocab_size is not None or self.data is None:
            return self.vocab_size
        return BPE_VOCAB_SIZE

    @property
    def warmup(self) -> int:
        """Warmup steps actually used: warmup_steps, capped at warmup_fraction of the run."""
        return min(self.warmup_steps, int(self.warmup_fraction * self.steps))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr_ratio * lr.

        A pure function of the step, so the scheduler's whole state is the step counter saved in checkpoints.
        """
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        decay_steps = max(1, self.steps - 1 - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        min_lr = self.min_lr_ratio * self.lr
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - min_lr)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["betas"] = list(self.betas)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return dataclass_from_dict(cls, values)
