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


@pytest.mark.cuda
def test_compiled_lm_has_no_graph_breaks_on_the_fast_path():
    """torch.compile(fullgraph=True) of a hybrid MoSA LM: router logits, the selection kernel and the fused op all
    stay in one graph (fullgraph raises on any break), and the compiled step matches eager."""
    torch._dynamo.reset()
    config = MoSAConfig.from_preset("micro", attention="mosa", sparsity=8, vocab_size=64)
    model = MoSALM(config).cuda()
    ids = torch.randint(0, 64, (2, config.max_seq_len), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    losses = []
    for forward in (model, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(ids, targets=ids)
        loss.backward()
        losses.append((loss.detach(), model.blocks[0].attn.sparse.router.weight.grad.clone()))
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=2e-2, atol=2e-2)
    assert torch.isfinite(losses[1][1]).all() and losses[1][1].abs().sum() > 0


@pytest.mark.cuda
def test_compiled_packed_lm_has_no_graph_breaks_on_the_fast_path():
    """Packed documents through the compiled fast path: with the layout prepared outside the call
    (MoSALM.document_layout), torch.compile(fullgraph=True) traces per-document selection and the op with document
    masks in one graph, for layouts of different widths, and matches eager."""
    torch._dynamo.reset()
    config = MoSAConfig.from_preset("micro", attention="mosa", sparsity=8, vocab_size=64)
    model = MoSALM(config).cuda()
    ids = torch.randint(0, 64, (2, config.max_seq_len), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    for lengths in ([100, config.max_seq_len - 100], [7, 60, config.max_seq_len - 67]):
        document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).expand(2, -1).cuda()
        layout = model.document_layout(ids, document_ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, expected = model(ids, targets=ids, document_ids=document_ids)
            _, loss = compiled(ids, targets=ids, documents=layout)
        torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)


def test_lm_traces_as_one_graph():
    """torch.compile(fullgraph=True) traces the whole LM, dispatch point included (the fast path's version of this is
    the CUDA test above); the eager backend keeps it cheap on a CPU."""
    torch._dynamo.reset()
    model = micro("mosa")
    ids = torch.randint(0, 97, (2, 40))
    _, expected = model(ids, targets=ids)
    _, loss = torch.compile(model, fullgraph=True, backend="eager")(ids, targets=ids)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("bad_id", [-1, 64])
def test_out_of_vocabulary_ids_are_named(bad_id):
    model = MoSALM(MoSAConfig.from_preset("micro", num_layers=1, vocab_size=64))
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[1, 5] = bad_id
    with pytest.raises(ValueError, match=rf"input_ids holds id {bad_id} at index \(1, 5\); allowed 0..63"):
        model(ids)
    with pytest.raises(ValueError, match=rf"targets holds id {bad_id} .*allowed 0..63"):
        model(torch.zeros_like(ids), targets=ids)


def test_all_ignored_targets_are_an_error_not_a_nan_loss():
    model = MoSALM(MoSAConfig.from_preset("micro", num_layers=1, vocab_size=64))
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="targets are all -100"):
        model(ids, targets=torch.full_like(ids, -100))


def test_dense_takes_no_sparsity():
    with pytest.raises(ValueError, match="attention='dense' attends to every token and takes no sparsity"):
        MoSAConfig.from_preset("micro", attention="dense", sparsity=4)
