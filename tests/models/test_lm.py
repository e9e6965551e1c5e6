import pytest
import torch

from torch_mosa import MoSAConfig, MoSALM

ATTENTIONS = ["dense", "mosa", "pure_mosa", "fixed", "routing", "local"]


def micro(attention, **kw):
    sparsity = None if attention == "dense" else 8
    return MoSALM(MoSAConfig.from_preset("micro", attention=attention, sparsity=sparsity, vocab_size=97, **kw))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_shapes_and_loss(attention):
    model = micro(attention)
    ids = torch.randint(0, 97, (2, 37))
    logits, loss = model(ids, ids)
    assert logits.shape == (2, 37, 97)
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model(ids)[1] is None


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("seq_len", [1, 2, 256])
def test_any_length(attention, seq_len):
    logits, _ = micro(attention)(torch.randint(0, 97, (1, seq_len)))
    assert logits.shape == (1, seq_len, 97)


def test_ignore_index():
    model = micro("mosa")
    ids = torch.randint(0, 97, (2, 16))
    targets = ids.clone()
    targets[:, :8] = -100
    logits, loss = model(ids, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 8:].flatten(0, 1), ids[:, 8:].flatten())
    torch.testing.assert_close(loss, expected)


def test_bad_inputs():
    model = micro("dense")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 97, (1, 257)))
    with pytest.raises(ValueError, match="seq_len=0"):
        model(torch.randint(0, 97, (1, 0)))
    with pytest.raises(ValueError, match="batch, seq_len"):
        model(torch.randint(0, 97, (16,)))
    with pytest.raises(TypeError, match="int64"):
        model(torch.rand(1, 4))
    with pytest.raises(ValueError, match="targets"):
        model(torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 5)))


def test_optimizer_groups_decay_only_matrices():
    model = micro("mosa")
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
