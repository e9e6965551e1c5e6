"""Training: `Trainer` (the loop), `TrainConfig`, checkpoints, evaluation, distributed helpers, comparison runs."""

from torch_mosa.runs import CheckpointError, load_model
from torch_mosa.train.checkpoint import load_checkpoint
from torch_mosa.train.config import TrainConfig
from torch_mosa.train.evaluate import evaluate
from torch_mosa.train.trainer import NonFiniteLossError, Trainer

__all__ = ["CheckpointError", "NonFiniteLossError", "TrainConfig", "Trainer", "evaluate", "load_checkpoint",
           "load_model"]
