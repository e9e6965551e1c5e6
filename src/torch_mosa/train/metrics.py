"""What a run writes besides checkpoints: `metrics.csv`, TensorBoard events and `summary.json`."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
# Router health (torch_mosa.inference.router_health), averaged over MoSA layers; TensorBoard also gets each layer's.
ROUTER_FIELDS = ("router_score_mean", "router_score_std", "router_unchosen_frac", "router_heads_per_token",
                 "router_jaccard", "router_first_token_share", "router_tail_share", "router_join_rate",
                 "router_join_target")
FIELDS = ("step", "tokens", "lr", "train_loss", "grad_norm", "val_loss", "val_ppl", "val_bpb", "val_recall_accuracy",
          "tokens_per_s", "elapsed_s", "causal_join_rate", "causal_overflow_rate", *ROUTER_FIELDS)


class MetricsWriter:
    """Appends rows to `<run>/metrics.csv` (flushed per row, so a crash loses nothing) and mirrors them to TensorBoard.

    On resume from step s the rows after s, written by the interrupted run, are dropped so the file describes one
    consistent run. TensorBoard is optional: without the package only the CSV is written.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        rows = [row for row in read_metrics(run_dir) if int(row["step"]) <= resume_step] if resume_step else []
        self._file = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS)
        self._writer.writeheader()
        self._writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
        self._file.flush()
        self._tensorboard = _summary_writer(run_dir, resume_step) if tensorboard else None

    def log(self, **values) -> None:
        """One row; the fields missing from `values` stay empty."""
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {FIELDS}")
        self._writer.writerow({k: ("" if v is None else v) for k, v in values.items()})
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in values.items():
                if name != "step" and value is not None:
                    self._tensorboard.add_scalar(name, value, values["step"])

    def log_tensorboard(self, step: int, values: dict[str, float]) -> None:
        """Scalars for TensorBoard only (e.g. per-layer router health, too many and too model-specific for the
        CSV's fixed columns)."""
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _summary_writer(run_dir, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional dependency
        return None
    # purge_step drops the events an interrupted run wrote after the step it is resumed from
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of `<run>/metrics.csv` with numbers as floats (step and tokens as ints) and empty cells as None."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [{name: _parse(name, value) for name, value in row.items()} for row in csv.DictReader(file)]


def _parse(name: str, value: str):
    if value in ("", None):
        return None
    return int(value) if name in ("step", "tokens") else float(value)


def write_summary(run_dir: str | os.PathLike, summary: dict) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return path


def read_summary(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: is {str(run_dir)!r} a finished training run?")
    return json.loads(path.read_text())
