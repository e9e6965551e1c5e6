"""Runs that travel and survive (issue 17): self-contained run directories, interruption with a checkpoint and
resume, one-line failures, no leftovers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
TINY = ["--num-layers", "1", "--hidden-size", "32", "--ffn-size", "64", "--head-dim", "8", "--max-seq-len", "32",
        "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--no-progress"]


def test_a_run_trained_with_relative_data_works_from_elsewhere_after_a_copy(tmp_path, mosa, capsys, shared_data,
                                                                            monkeypatch):
    (tmp_path / "home").mkdir()
    shutil.copy(shared_data / "tinyshakespeare" / "input.txt", tmp_path / "home" / "shakespeare.txt")
    monkeypatch.chdir(tmp_path / "home")
    assert mosa("prepare", "shakespeare.txt", "--out", "data/shakespeare", "--tokenizer", "byte") == 0
    assert mosa("train", "--data", "data/shakespeare", "--out", "runs/r", "--steps", 2, "--attention", "mosa",
                "--sparsity", 4, *TINY) == 0
    assert json.loads(Path("runs/r/config.json").read_text())["train"]["data"] == str(
        tmp_path / "home" / "data" / "shakespeare")
    shutil.copytree("runs/r", tmp_path / "elsewhere" / "r")
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert mosa("eval", "r", "--seq-len", 32, "--max-batches", 1, "--json") == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 8 * 32
    assert mosa("calibrate", "r", "--batches", 1, "--seq-len", 32) == 0
    assert mosa("generate", "r", "--prompt", "ROMEO:", "--max-new-tokens", 3, "--no-stop") == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("ROMEO:")

    # On another machine the training shards are gone: generation needs only the run, calibration takes --data.
    shutil.rmtree(tmp_path / "home" / "data")
    assert mosa("generate", "r", "--prompt", "ROMEO:", "--max-new-tokens", 2) == 0
    assert mosa("calibrate", "r", "--batches", 1, "--seq-len", 32) == 2
    assert "pass --data" in capsys.readouterr().err
    assert mosa("prepare", tmp_path / "home" / "shakespeare.txt", "--out", "shards", "--tokenizer", "r/tokenizer") == 0
    assert mosa("calibrate", "r", "--batches", 1, "--seq-len", 32, "--data", "shards") == 0


def _train(out, steps, *extra):
    return [sys.executable, "-m", "torch_mosa.cli", "train", "--out", str(out), "--steps", str(steps),
            "--log-interval", "1", "--eval-interval", "0", "--checkpoint-interval", "0", *TINY, *extra]


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_training_with_a_checkpoint_and_resume_ends_as_uninterrupted(tmp_path, signal_number):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    steps = 60
    process = subprocess.Popen(_train(tmp_path / "cut", steps), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.csv"
    deadline = time.monotonic() + 120
    while (not metrics.is_file() or len(metrics.read_text().splitlines()) < 4) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal_number)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal_number, err
    assert "Traceback" not in err and "--resume" in err.splitlines()[-1]
    checkpoints = [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()]
    assert len(checkpoints) == 1
    reached = int(checkpoints[0].removeprefix("step_"))
    assert 3 <= reached < steps and f"after step {reached} of {steps}" in err

    subprocess.run([sys.executable, "-m", "torch_mosa.cli", "train", "--out", str(tmp_path / "cut"), "--resume",
                    "--no-progress"], env=env, check=True, capture_output=True)
    subprocess.run(_train(tmp_path / "whole", steps), env=env, check=True, capture_output=True)
    cut, whole = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("cut", "whole"))
    assert cut["train_loss"] == whole["train_loss"] and cut["val_loss"] == whole["val_loss"]


def test_resume_edge_cases(tmp_path, mosa, capsys):
    run = tmp_path / "run"
    assert mosa("train", "--out", run, "--steps", 4, "--checkpoint-interval", 2, *TINY) == 0
    rows = (run / "metrics.csv").read_text()
    for steps in (4, 3):  # at or below the current step: refused, nothing rewritten
        assert mosa("train", "--out", run, "--resume", "--steps", steps) == 2
        assert "already at step 4: pass --steps greater than 4" in capsys.readouterr().err
    assert (run / "metrics.csv").read_text() == rows

    # overrides given on resume are recorded in the run's configuration
    assert mosa("train", "--out", run, "--resume", "--steps", 6, "--batch-size", 8, "--no-progress") == 0
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 8

    # a corrupt latest checkpoint: resume falls back to the previous one, naming both
    latest = run / "checkpoints" / "step_00000006"
    (latest / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="step_00000006.*corrupt.*previous checkpoint .*step_00000004"):
        assert mosa("train", "--out", run, "--resume", "--steps", 7, "--no-progress") == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 7


def test_failures_print_one_line_and_leave_nothing(tmp_path, mosa, capsys, monkeypatch):
    import torch
    from safetensors import SafetensorError

    (tmp_path / "file").write_text("")
    cases = [
        (["train", "--out", tmp_path / "file" / "run", "--steps", 1, *TINY], 2, "Not a directory"),
        (["train", "--out", tmp_path / "r1", "--steps", 1, "--device", "cuda", *TINY], 2, "CUDA is not available"),
        (["eval", tmp_path, "--device", "foo"], 2, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'foo'"),
        (["generate", tmp_path, "--prompt", "x", "--device", "cuda:7"], 2, "device='cuda:7'"),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, code, message in cases:
        assert mosa(*argv) == code
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r1").exists()  # a run that failed before its first step leaves no directory

    # disk full while writing a checkpoint: one line, exit 2, no .tmp-* directory left
    def disk_full(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    assert mosa("train", "--out", tmp_path / "r2", "--steps", 2, *TINY) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert list((tmp_path / "r2" / "checkpoints").iterdir()) == []


def test_internal_errors_exit_1_with_the_traceback_behind_debug(mosa, capsys, monkeypatch):
    from torch_mosa.cli import flops

    def broken(args):
        raise AssertionError("a bug")

    monkeypatch.setattr(flops, "run", broken)
    assert mosa("flops") == 1
    err = capsys.readouterr().err
    assert "internal error: AssertionError: a bug" in err and "--debug" in err and "Traceback" not in err
    assert mosa("--debug", "flops") == 1
    assert "Traceback" in capsys.readouterr().err


def test_version(mosa, capsys):
    from torch_mosa import __version__

    with pytest.raises(SystemExit) as exit_info:
        mosa("--version")
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out


def test_checkpoint_files_have_the_mode_of_other_files(tmp_path, mosa):
    assert mosa("train", "--out", tmp_path, "--steps", 1, *TINY) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "checkpoints" / "step_00000001").iterdir()}
    assert set(modes.values()) == {(tmp_path / "summary.json").stat().st_mode & 0o777}, modes


def test_a_fresh_run_in_a_reused_directory_drops_stale_tensorboard_events(tmp_path, mosa):
    pytest.importorskip("torch.utils.tensorboard")
    stale = tmp_path / "tensorboard" / "events.out.tfevents.old"
    stale.parent.mkdir()
    stale.write_text("")
    assert mosa("train", "--out", tmp_path, "--steps", 1, *TINY) == 0
    assert not stale.exists()
