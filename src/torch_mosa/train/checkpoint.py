"""Checkpoints without pickle: tensors in safetensors, structure in JSON, written atomically.

A run keeps its checkpoints in `<run>/checkpoints/step_00000100/`, each holding
  - `model.safetensors`: the uncompiled, unwrapped module's state dict (loadable by `load_model`);
  - `state.safetensors` + `state.json`: optimizer state (keyed by parameter name, so it survives a change of
    wrapper or world size), data loader position, RNG states and step; every tensor sits in the safetensors file
    and the JSON tree refers to it by key;
  - `config.json`: {"model": MoSAConfig.to_dict(), "train": TrainConfig.to_dict()}.
A checkpoint is written into a hidden temporary directory that is renamed into place, so a crash never leaves a
half-written `step_*` directory, and only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

# The read side (finding and loading checkpoints, a run's tokenizer and data) lives in torch_mosa.runs, the one
# place every command resolves a checkpoint path; imported here for the trainer and older callers.
from torch_mosa.runs import (CHECKPOINT_DIR, CONFIG_FILE, MODEL_FILE, STEP_PREFIX, CheckpointError,  # noqa: F401
                             checkpoint_dirs, latest_checkpoint, load_model, load_model_state, read_config,
                             read_json, read_safetensors, resolve_checkpoint, write_model_weights, write_safetensors)

STATE_TENSORS_FILE = "state.safetensors"
STATE_JSON_FILE = "state.json"
FORMAT = "torch-mosa-checkpoint"
FORMAT_VERSION = 1
# A JSON object {TENSOR_REF: key} stands for the tensor stored under `key` in state.safetensors.
TENSOR_REF = "__tensor__"


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                    trainer_state: dict, config: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`; returns its directory.

    trainer_state: JSON-able values and tensors (data loader state, RNG states, counters).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    temporary = root / f".tmp-{final.name}"
    temporary.mkdir()
    try:
        write_safetensors({name: t.detach().cpu().contiguous() for name, t in model_state.items()},
                          temporary / MODEL_FILE)
        tensors: dict[str, torch.Tensor] = {}
        tree = {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
                "optimizer": _tensors_out(optimizer_state, tensors, "optimizer"),
                "trainer": _tensors_out(trainer_state, tensors, "trainer")}
        write_safetensors(tensors, temporary / STATE_TENSORS_FILE)
        (temporary / STATE_JSON_FILE).write_text(json.dumps(tree) + "\n")
        (temporary / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if final.exists():  # a rerun of the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(temporary, final)
    finally:  # a failed write (disk full) leaves nothing behind to fill the disk further
        shutil.rmtree(temporary, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Everything `save_checkpoint` wrote: {step, model, optimizer, trainer, config, path}.

    Raises CheckpointError naming the file for a missing, truncated or malformed part.
    """
    path = resolve_checkpoint(path)
    state = read_json(path / STATE_JSON_FILE)
    if state.get("format") != FORMAT or state.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / STATE_JSON_FILE}: format={state.get('format')!r} "
                              f"version={state.get('version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
    tensors = read_safetensors(path / STATE_TENSORS_FILE)
    try:
        optimizer = _tensors_in(state["optimizer"], tensors)
        trainer = _tensors_in(state["trainer"], tensors)
    except KeyError as missing:
        raise CheckpointError(f"{path}: {STATE_JSON_FILE} refers to {missing}, absent from {STATE_TENSORS_FILE}") from None
    return {"step": state["step"], "model": read_safetensors(path / MODEL_FILE), "optimizer": optimizer,
            "trainer": trainer, "config": read_config(path), "path": path}


def rng_state() -> dict:
    """Every random generator the run may draw from: torch CPU and CUDA, numpy, Python."""
    numpy_state = np.random.get_state(legacy=False)
    version, python_state, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {**numpy_state, "state": {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}},
             "python": {"version": version, "state": list(python_state), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"],
                                                  "key": np.array(numpy_state["state"]["key"], dtype=np.uint32)}})
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _tensors_out(tree, tensors: dict[str, torch.Tensor], key: str):
    """`tree` with every tensor moved into `tensors` (under a path-like key) and replaced by a reference."""
    if isinstance(tree, torch.Tensor):
        tensors[key] = tree.detach().cpu().contiguous()
        return {TENSOR_REF: key}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise TypeError(f"checkpoint state at {key!r} has non-string keys: {list(tree)[:5]}")
        return {k: _tensors_out(v, tensors, f"{key}/{k}") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_tensors_out(v, tensors, f"{key}/{i}") for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"checkpoint state at {key!r} holds a {type(tree).__name__}, which is not JSON or a tensor")


def _tensors_in(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, dict):
        if set(tree) == {TENSOR_REF}:
            return tensors[tree[TENSOR_REF]]
        return {k: _tensors_in(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_tensors_in(v, tensors) for v in tree]
    return tree
