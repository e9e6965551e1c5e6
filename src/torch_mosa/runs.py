"""A run directory read after training: its checkpoints, model, tokenizer and data, resolved in one place.

Training (`torch_mosa.train`), evaluation, calibration, generation and the CLI all find a checkpoint, load its
model and find the run's tokenizer and data here, so a path given on the command line is resolved once, the same
way everywhere. A run directory is self-contained for everything after training:

    <run>/config.json           {"model": MoSAConfig, "train": TrainConfig}; `train.data` is stored absolute
    <run>/tokenizer/            the tokenizer of the run's data (copied there by the trainer)
    <run>/data/                 the run's token shards, when it was trained on raw text or the synthetic task
    <run>/checkpoints/step_*/   model.safetensors, state.safetensors, state.json, config.json

so `mosa generate RUN` works from any directory and after the run is copied to another machine, and
evaluation and calibration read `<run>/data` or the absolute shard directory it trained on (or `--data`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from torch_mosa.config import MoSAConfig

CHECKPOINT_DIR = "checkpoints"
STEP_PREFIX = "step_"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
# Permissions of every file a run writes (safetensors creates its files 0600); the umask still applies.
FILE_MODE = 0o666


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the path."""


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / MODEL_FILE).exists() or path.name.startswith(STEP_PREFIX):
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{str(path)!r} is neither a checkpoint directory nor a run directory with checkpoints")
    return latest


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory holding `checkpoint` (<run>/checkpoints/step_*), or the checkpoint itself when it stands
    alone (a checkpoint directory copied out of its run)."""
    if checkpoint.parent.name == CHECKPOINT_DIR and (checkpoint.parent.parent / CONFIG_FILE).is_file():
        return checkpoint.parent.parent
    return checkpoint


def read_config(path: str | os.PathLike) -> dict:
    """The `config.json` of a checkpoint (or of a run directory, which holds the same file)."""
    config = read_json(Path(path) / CONFIG_FILE)
    if "model" not in config:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE} has no 'model' section")
    return config


def load_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu"):
    """(model, config) from a checkpoint or a run directory (its latest checkpoint), in eval mode on `device`.

    The model is built on the meta device and takes the stored tensors by assignment, so no memory is spent on
    an initialization that would be overwritten.
    """
    from torch_mosa.models.lm import MoSALM

    path = resolve_checkpoint(checkpoint)
    config = MoSAConfig.from_dict(read_config(path)["model"])
    weights = read_safetensors(path / MODEL_FILE)
    with torch.device("meta"):
        model = MoSALM(config)
    load_model_state(model, weights, path)
    return model.to(device).eval(), config


def load_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Load `weights` into `model` by assignment; a mismatch raises CheckpointError naming the checkpoint."""
    try:
        model.load_state_dict(weights, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path / MODEL_FILE} does not fit the model of its config.json: {error}") from None
    still_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{path / MODEL_FILE} leaves tensors uninitialized: {still_meta[:5]}")


def write_model_weights(checkpoint: Path, model_state: dict[str, torch.Tensor]) -> None:
    """Replace a checkpoint's model weights atomically (e.g. after calibrating its causal thresholds)."""
    temporary = checkpoint / f".tmp-{MODEL_FILE}"
    try:
        write_safetensors({name: t.detach().cpu().contiguous() for name, t in model_state.items()}, temporary)
        os.replace(temporary, checkpoint / MODEL_FILE)
    finally:
        temporary.unlink(missing_ok=True)


def tokenizer_dir(checkpoint: Path) -> Path:
    """The directory of the run's tokenizer: `<run>/tokenizer`, or for runs written before it existed, the
    tokenizer beside the run's training data."""
    own = run_dir_of(checkpoint) / TOKENIZER_DIR
    return own if own.is_dir() else training_data_dir(checkpoint)


def load_run_tokenizer(checkpoint: Path):
    """The tokenizer the run of `checkpoint` was trained with."""
    from torch_mosa.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir(checkpoint))


def training_data_dir(checkpoint: Path, data: str | os.PathLike | None = None) -> Path:
    """The shard directory that the run of `checkpoint` trained on, or `data` when given (it must be one).

    Looked for in `<run>/data`, then at the run's `train.data` (absolute, or relative to the run; older runs
    stored it relative to the directory they were started from, tried last).
    """
    from torch_mosa.data.shards import is_shard_dir

    if data is not None:
        if not is_shard_dir(data):
            raise ValueError(f"--data {str(data)!r} is not a prepared shard directory (no meta.json): run "
                             "`mosa prepare` on it with the run's tokenizer first")
        return Path(data)
    run = run_dir_of(checkpoint)
    spec = read_config(checkpoint).get("train", {}).get("data")
    candidates = [run / DATA_DIR]
    if spec is not None and not spec.startswith("hf:"):
        candidates += [run / spec, Path(spec)]
    for candidate in candidates:
        if is_shard_dir(candidate):
            return candidate
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ValueError(f"the training data of {checkpoint} is not there any more (looked in {looked}): pass --data "
                     "with a prepared shard directory")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {error}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        return load_file(path)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError for bad files
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {error}") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file with the permissions of every other file (it creates files 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, FILE_MODE & ~umask)
