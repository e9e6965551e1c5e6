import json
import random

import numpy as np
import pytest
import torch

from torch_mosa.train import CheckpointError, load_checkpoint, load_model
from torch_mosa.train.checkpoint import (checkpoint_dirs, latest_checkpoint, rng_state, save_checkpoint,
                                         set_rng_state)


def _save(run_dir, step, keep=3, model_state=None):
    model_state = model_state or {"w": torch.arange(6.0).reshape(2, 3)}
    optimizer_state = {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}},
                       "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": ["w"]}]}
    trainer_state = {"step": step, "loader": {"generator": torch.ByteTensor([1, 2, 3]), "seed": 0}}
    return save_checkpoint(run_dir, step, model_state, optimizer_state, trainer_state,
                           {"model": {"hidden_size": 4}}, keep=keep)


def test_round_trip_without_pickle(tmp_path):
    path = _save(tmp_path, 5)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "state.json",
                                                      "state.safetensors"]
    state = load_checkpoint(tmp_path)  # a run directory resolves to its latest checkpoint
    assert state["step"] == 5 and state["path"] == path
    torch.testing.assert_close(state["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert state["optimizer"]["state"]["w"]["step"].item() == 3.0
    assert state["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    assert state["trainer"]["loader"]["generator"].tolist() == [1, 2, 3]
    assert state["config"] == {"model": {"hidden_size": 4}}


def test_keeps_only_the_newest_and_leaves_no_temporary(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000003", "step_00000004"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert latest_checkpoint(tmp_path).name == "step_00000004"


@pytest.mark.parametrize("damage, match", [
    (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 20), "model.safetensors' is corrupt"),
    (lambda p: (p / "state.safetensors").unlink(), "state.safetensors' is missing"),
    (lambda p: (p / "state.json").write_text("{not json"), "state.json' is corrupt"),
    (lambda p: (p / "state.json").write_text(json.dumps({"format": "other"})), "expected 'torch-mosa-checkpoint'"),
])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage, match):
    damage(_save(tmp_path, 1))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a run directory"):
        load_checkpoint(tmp_path)


def test_load_model_builds_on_meta_and_assigns(tmp_path, tiny_model):
    from torch_mosa import MoSALM

    config = tiny_model(vocab_size=50)
    model = MoSALM(config)
    path = save_checkpoint(tmp_path, 1, model.state_dict(), {}, {}, {"model": config.to_dict()}, keep=1)
    loaded, loaded_config = load_model(path)
    assert loaded_config == config and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(loaded(x)[0], model.eval()(x)[0], rtol=0, atol=0)


def test_load_model_refuses_weights_of_another_model(tmp_path, tiny_model):
    from torch_mosa import MoSALM

    config = tiny_model(vocab_size=50)
    other = MoSALM(tiny_model(vocab_size=60))
    path = save_checkpoint(tmp_path, 1, other.state_dict(), {}, {}, {"model": config.to_dict()}, keep=1)
    with pytest.raises(CheckpointError, match="does not fit the model of its config.json"):
        load_model(path)


def test_rng_states_round_trip_through_json(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = _save_rng(tmp_path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def _save_rng(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {}, {"rng": rng_state()}, {"model": {}}, keep=1)
    return load_checkpoint(tmp_path)["trainer"]["rng"]
