import pytest

from torch_mosa import MoSAConfig
from torch_mosa.train import TrainConfig


def _tiny_model(attention: str = "mosa", sparsity: int | None = 4, **overrides) -> MoSAConfig:
    """A one-layer micro model that trains a step in milliseconds on a CPU."""
    sizes = dict(num_layers=1, hidden_size=32, ffn_size=64, head_dim=8, max_seq_len=32)
    return MoSAConfig.from_preset("micro", attention=attention, sparsity=sparsity, **{**sizes, **overrides})


def _tiny_train(**overrides) -> TrainConfig:
    """A few steps of 4 x 16 tokens on the synthetic task, logging every step."""
    values = dict(steps=6, batch_size=4, seq_len=16, vocab_size=64, eval_interval=3, eval_batches=2,
                  checkpoint_interval=3, keep_checkpoints=5, log_interval=1, tensorboard=False, progress=False)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture
def tiny_model():
    return _tiny_model


@pytest.fixture
def tiny_train():
    return _tiny_train
