"""SPEC §6 benchmark cases A-D (one attention layer, bf16, forward+backward) and a full training step of tiny."""

from torch_mosa.bench.cases import CASES, TRAIN_MODELS, run_cases, train_step_tokens_per_second
from torch_mosa.bench.report import markdown_report

__all__ = ["CASES", "TRAIN_MODELS", "markdown_report", "run_cases", "train_step_tokens_per_second"]
