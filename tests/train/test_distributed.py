"""Two gloo processes on the CPU train exactly what one process trains with the same global batch."""

import os
import shutil
import socket

import pytest
import torch.multiprocessing as mp

from torch_mosa import MoSAConfig
from torch_mosa.train import Trainer, TrainConfig
from torch_mosa.train.metrics import read_metrics, read_summary

# Float sums in another order (per-rank means, then the all-reduce) move the losses by ~1e-7 relative.
RELATIVE_TOLERANCE = 1e-5
MODEL = dict(attention="mosa", sparsity=4, num_layers=1, hidden_size=32, ffn_size=64, head_dim=8, max_seq_len=32)


def _train_config(steps: int, strategy: str = "ddp", routing: str = "topk") -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, seq_len=16, vocab_size=64, eval_interval=2, eval_batches=2,
                       checkpoint_interval=2, keep_checkpoints=5, log_interval=1, strategy=strategy,
                       tensorboard=False, progress=False, routing=routing)


def _worker(rank: int, world_size: int, port: int, out_dir: str, steps: int, strategy: str, routing: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    Trainer(MoSAConfig.from_preset("micro", **MODEL), _train_config(steps, strategy, routing), out_dir).train()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(run_dir, field):
    return {row["step"]: row[field] for row in read_metrics(run_dir) if row[field] is not None}


@pytest.mark.parametrize("strategy, routing", [("ddp", "topk"), ("fsdp", "topk"), ("ddp", "causal"),
                                               ("fsdp", "causal")])
def test_two_processes_match_one_and_resume_on_one(tmp_path, strategy, routing):
    """Under causal training the threshold EMA is summed over ranks, so two processes move the thresholds as one
    process does with the whole batch (neither rank 0's half, which DDP's buffer broadcast would give, nor a
    per-rank threshold, which FSDP would leave)."""
    single, double = tmp_path / "single", tmp_path / "double"
    Trainer(MoSAConfig.from_preset("micro", **MODEL), _train_config(4, routing=routing), single).train()
    mp.spawn(_worker, args=(2, _free_port(), str(double), 4, strategy, routing), nprocs=2, join=True)
    assert read_summary(double)["world_size"] == 2
    fields = ("train_loss", "val_loss") + (("causal_join_rate", "causal_overflow_rate") if routing == "causal" else ())
    for field in fields:
        one, two = _metrics(single, field), _metrics(double, field)
        assert sorted(two) == sorted(one)
        assert [two[s] for s in sorted(two)] == pytest.approx([one[s] for s in sorted(one)], rel=RELATIVE_TOLERANCE)

    # The 2-process checkpoint of step 2 resumes in one process (same global batch) and continues the same run.
    resumed = tmp_path / "resumed"
    shutil.copytree(double / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    Trainer(MoSAConfig.from_preset("micro", **MODEL), _train_config(4, routing=routing), resumed, resume=True).train()
    one, again = _metrics(single, "train_loss"), _metrics(resumed, "train_loss")
    assert [again[s] for s in (3, 4)] == pytest.approx([one[s] for s in (3, 4)], rel=RELATIVE_TOLERANCE)
