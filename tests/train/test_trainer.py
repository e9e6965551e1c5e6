import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from torch_mosa.train import NonFiniteLossError, Trainer, load_model
from torch_mosa.train.metrics import read_metrics


def _train_losses(run_dir):
    return {row["step"]: row["train_loss"] for row in read_metrics(run_dir) if row["train_loss"] is not None}


def test_run_writes_config_metrics_checkpoints_and_summary(tmp_path, tiny_model, tiny_train):
    summary = Trainer(tiny_model(), tiny_train(tensorboard=True), tmp_path).train()
    for field in ("steps", "tokens", "train_loss", "val_loss", "val_ppl", "params", "forward_flops_per_token",
                  "tokens_per_s", "peak_memory_bytes", "wall_clock_s", "val_recall_accuracy"):
        assert summary[field] is not None, field
    assert (summary["steps"], summary["tokens"]) == (6, 6 * 4 * 16)
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["vocab_size"] == 64 and config["train"]["steps"] == 6
    assert sorted(_train_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    validations = [r for r in read_metrics(tmp_path) if r["val_loss"] is not None]
    assert [r["step"] for r in validations] == [3, 6]
    assert all(0 <= r["val_recall_accuracy"] <= 1 for r in validations)
    assert validations[-1]["val_recall_accuracy"] == summary["val_recall_accuracy"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert list((tmp_path / "tensorboard").iterdir())
    model, _ = load_model(tmp_path)
    assert model.num_parameters() == summary["params"]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, tiny_model, tiny_train):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    Trainer(tiny_model(), tiny_train(), full).train()
    # The resumed run starts from the step-3 checkpoint alone, as if the process had died right after it.
    shutil.copytree(full / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    Trainer(tiny_model(), tiny_train(), resumed, resume=True).train()
    full_losses, resumed_losses = _train_losses(full), _train_losses(resumed)
    assert sorted(resumed_losses) == [4, 5, 6]
    assert [resumed_losses[s] for s in (4, 5, 6)] == [full_losses[s] for s in (4, 5, 6)]
    full_weights = load_file(full / "checkpoints" / "step_00000006" / "model.safetensors")
    resumed_weights = load_file(resumed / "checkpoints" / "step_00000006" / "model.safetensors")
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)


def test_resume_keeps_earlier_metrics_and_extends_the_run(tmp_path, tiny_model, tiny_train):
    Trainer(tiny_model(), tiny_train(steps=3), tmp_path).train()
    summary = Trainer(tiny_model(), tiny_train(steps=5), tmp_path, resume=True).train()
    assert summary["steps"] == 5
    assert sorted(_train_losses(tmp_path)) == [1, 2, 3, 4, 5]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model, tiny_train):
    # An absurd learning rate blows the weights up after the first update: the loss of step 2 is not finite.
    config = tiny_train(lr=1e30, warmup_steps=0, grad_clip=0.0, checkpoint_interval=1)
    with pytest.raises(NonFiniteLossError, match=r"at step 2; stopping \(the last good checkpoint is .*step_00000001"):
        Trainer(tiny_model(), config, tmp_path).train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    model, _ = load_model(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sequence_longer_than_the_model_is_refused(tmp_path, tiny_model, tiny_train):
    with pytest.raises(ValueError, match="seq_len=64 exceeds the model's max_seq_len=32"):
        Trainer(tiny_model(), tiny_train(seq_len=64), tmp_path).train()


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tmp_path, tiny_model, tiny_train):
    with pytest.raises(ValueError, match="holds no checkpoint"):
        Trainer(tiny_model(), tiny_train(), tmp_path, resume=True).train()
    Trainer(tiny_model(), tiny_train(steps=1), tmp_path).train()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(tiny_model(), tiny_train(steps=1), tmp_path).train()


def test_resume_refuses_another_model(tmp_path, tiny_model, tiny_train):
    Trainer(tiny_model(), tiny_train(steps=1), tmp_path).train()
    with pytest.raises(ValueError, match="model config differs"):
        Trainer(tiny_model(hidden_size=48), tiny_train(steps=2), tmp_path, resume=True).train()


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_model, tiny_train):
    # A step's global batch is the synthetic task's batch of that step, cut into micro-batches, so two
    # micro-batches of 2 hold the sequences of one batch of 4: the runs differ only in the order of float additions.
    Trainer(tiny_model(), tiny_train(steps=4), tmp_path / "whole").train()
    Trainer(tiny_model(), tiny_train(steps=4, grad_accum_steps=2), tmp_path / "accumulated").train()
    whole, accumulated = ([r for r in read_metrics(tmp_path / run) if r["train_loss"] is not None]
                          for run in ("whole", "accumulated"))
    for field in ("train_loss", "grad_norm"):  # the gradient norm would show a wrong scaling that Adam hides
        assert [r[field] for r in accumulated] == pytest.approx([r[field] for r in whole], rel=1e-5)


def test_short_synthetic_run_learns_from_the_answers(tmp_path, tiny_model, tiny_train):
    # The loss covers the answers alone: it starts at ln(vocab_size) and falls well below it once the model puts
    # its mass on values and on the values of its own sequence (the full minute-long run is in docs/training.md).
    config = tiny_train(steps=60, batch_size=16, vocab_size=32, lr=1e-2, eval_interval=0, checkpoint_interval=0)
    summary = Trainer(tiny_model(num_layers=2), config, tmp_path).train()
    first = _train_losses(tmp_path)[1]
    assert first == pytest.approx(math.log(32), rel=0.05)
    assert summary["val_loss"] < 0.6 * first
    assert summary["val_tokens"] == 2 * 16 * 2  # eval_batches x batch_size x one answer per pair (2 pairs)
    assert summary["val_recall_accuracy"] > 0.3  # chance is 1/15


def test_synthetic_data_of_another_length_is_refused(tmp_path, tiny_model, tiny_train):
    Trainer(tiny_model(), tiny_train(steps=1), tmp_path / "first").train()
    with pytest.raises(ValueError, match="has sequences of 16 tokens; train it with seq_len=16, not 32"):
        Trainer(tiny_model(), tiny_train(data=str(tmp_path / "first" / "data"), seq_len=32),
                tmp_path / "second").train()


def test_router_health_goes_to_the_csv_and_tensorboard(tmp_path, tiny_model, tiny_train):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from torch_mosa.train.metrics import ROUTER_FIELDS

    Trainer(tiny_model(num_layers=2), tiny_train(steps=4, log_interval=2, tensorboard=True), tmp_path).train()
    logged = [row for row in read_metrics(tmp_path) if row["train_loss"] is not None]
    assert [row["step"] for row in logged] == [2, 4]
    for row in logged:
        for field in ROUTER_FIELDS:
            if field in ("router_join_rate", "router_join_target"):
                assert row[field] is None  # top-k training: no causal join target
            else:
                assert row[field] is not None and math.isfinite(row[field]), field
        assert 0 < row["router_score_mean"] < 1 and 0 <= row["router_unchosen_frac"] <= 1
        assert row["router_first_token_share"] > 0  # micro uses include_first
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    for layer in (0, 1):
        for metric in ("score_mean", "score_std", "unchosen_frac", "heads_per_token", "jaccard",
                       "first_token_share", "tail_share"):
            assert f"router/layer{layer}/{metric}" in tags
    assert [event.step for event in events.Scalars("router/layer1/jaccard")] == [2, 4]
    assert "router_unchosen_frac" in tags


def test_dense_models_leave_the_router_columns_empty(tmp_path, tiny_model, tiny_train):
    Trainer(tiny_model(attention="dense", sparsity=None), tiny_train(steps=2), tmp_path).train()
    rows = read_metrics(tmp_path)
    assert rows and all(row["router_score_mean"] is None for row in rows)


def _short_documents(directory, count=40):
    """A corpus of many short documents (one per file), so that every window holds several."""
    directory.mkdir()
    for i in range(count):
        (directory / f"{i:02d}.txt").write_text(f"Document {i}: " + "abcdefgh"[i % 8] * (5 + i % 11) + ".\n")
    return directory


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_pack_documents_routes_each_document_of_a_window_apart(tmp_path, tiny_model, tiny_train, monkeypatch,
                                                               routing):
    """With pack_documents the model gets document ids that change exactly at the end-of-text tokens, in training
    and in validation, and the run trains and evaluates."""
    from torch_mosa.models.lm import MoSALM

    calls = []
    forward = MoSALM.forward

    def spy(self, input_ids, *args, document_ids=None, documents=None, **kwargs):
        ids = document_ids if documents is None else documents.ids  # training passes a prepared layout
        calls.append((input_ids.clone(), None if ids is None else ids.clone()))
        return forward(self, input_ids, *args, document_ids=document_ids, documents=documents, **kwargs)

    monkeypatch.setattr(MoSALM, "forward", spy)
    data = _short_documents(tmp_path / "corpus")
    summary = Trainer(tiny_model(), tiny_train(data=str(data), tokenizer="byte", pack_documents=True, steps=3,
                                               routing=routing), tmp_path / "run").train()
    assert math.isfinite(summary["val_loss"])
    eot = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())["eot_id"]
    assert calls and all(ids is not None for _, ids in calls)
    for tokens, ids in calls:
        opens = torch.zeros_like(ids, dtype=torch.bool)
        opens[:, 1:] = ids[:, 1:] != ids[:, :-1]
        assert torch.equal(opens[:, 1:], tokens[:, 1:] == eot)
    assert any((ids[:, -1] > ids[:, 0]).any() for _, ids in calls), "windows must hold several documents"


def test_pack_documents_needs_a_text_corpus(tmp_path, tiny_model, tiny_train):
    with pytest.raises(ValueError, match="pack_documents=True needs a text corpus"):
        Trainer(tiny_model(), tiny_train(pack_documents=True), tmp_path).train()
