"""Packed documents through the whole LM: a packed row equals each document run alone (float64, outputs and
gradients), for every head kind that takes documents, under top-k and causal routing."""

import pytest
import torch

from torch_mosa import MoSAConfig
from torch_mosa.models.lm import MoSALM
from torch_mosa.ops.documents import document_layout

LENGTHS = [1, 2, 63, 65, 781]  # odd lengths, a document of one token, and one long enough for many slots
VOCAB = 50
KINDS = [
    pytest.param("mosa", dict(sparsity=8, num_dense_heads=2), id="mosa"),
    pytest.param("pure_mosa", dict(sparsity=16), id="pure_mosa"),
    pytest.param("local", dict(sparsity=4, window=16, num_dense_heads=2), id="local"),
    pytest.param("fixed", dict(sparsity=8, num_dense_heads=2), id="fixed"),
    pytest.param("fixed", dict(sparsity=8, num_dense_heads=2, fixed_offsets="per_head"), id="fixed-per-head"),
    pytest.param("dense", dict(), id="dense"),
]


def make_model(attention, seed=0, **extra):
    torch.manual_seed(seed)
    config = MoSAConfig(vocab_size=VOCAB, num_layers=2, hidden_size=32, ffn_size=64, head_dim=8, num_heads=6,
                        max_seq_len=1024, attention=attention, **extra)
    model = MoSALM(config).double()
    for layer in model.mosa_layers:
        torch.nn.init.normal_(layer.router.weight, std=0.5)
        layer.causal_threshold.normal_()
        layer.set_causal_limits(capacity=24)  # keeps the causal forward narrow (and tests capacity per document)
    return model


def packed_and_alone(model, routing, lengths=LENGTHS):
    total = sum(lengths)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (1, total), generator=generator)
    document_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    weights = torch.randn(1, total, VOCAB, dtype=torch.float64, generator=generator)

    def grads():
        result = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return result

    logits, _ = model(input_ids, document_ids=document_ids, routing=routing)
    (logits * weights).sum().backward()
    packed = logits.detach(), grads()
    start, pieces = 0, []
    for length in lengths:
        piece, _ = model(input_ids[:, start:start + length], routing=routing)
        (piece * weights[:, start:start + length]).sum().backward()
        pieces.append(piece.detach())
        start += length
    return packed, (torch.cat(pieces, 1), grads())


@pytest.mark.parametrize("routing", ["topk", "causal"])
@pytest.mark.parametrize("attention, extra", KINDS)
def test_packed_row_equals_each_document_alone(attention, extra, routing):
    model = make_model(attention, **extra)
    (logits, grads), (alone_logits, alone_grads) = packed_and_alone(model, routing)
    torch.testing.assert_close(logits, alone_logits, rtol=1e-10, atol=1e-12)
    assert grads.keys() == alone_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], alone_grads[name], rtol=1e-9, atol=1e-11, msg=name)


def test_documents_are_kept_apart():
    """The comparison can fail: the same tokens as one document give other outputs after the first boundary
    (causal routing, so that the first document's outputs cannot depend on what follows it)."""
    model = make_model("mosa", sparsity=8, num_dense_heads=2)
    input_ids = torch.randint(0, VOCAB, (1, 40))
    packed, _ = model(input_ids, document_ids=torch.tensor([[0] * 20 + [1] * 20]), routing="causal")
    whole, _ = model(input_ids, routing="causal")
    torch.testing.assert_close(packed[:, :20], whole[:, :20])
    assert not torch.allclose(packed[:, 20:], whole[:, 20:])


def test_cu_seqlens_equals_document_ids_and_positions_switch():
    model = make_model("mosa", sparsity=4, num_dense_heads=2)
    input_ids = torch.randint(0, VOCAB, (1, 30))
    by_ids, _ = model(input_ids, document_ids=torch.tensor([[0] * 7 + [1] * 23]))
    by_cu, _ = model(input_ids, cu_seqlens=torch.tensor([0, 7, 30]))
    torch.testing.assert_close(by_ids, by_cu, rtol=0, atol=0)
    # Positions continued along the row: as attention stays inside documents and RoPE scores depend on position
    # differences only, the outputs agree up to rounding (restarting keeps packed runs equal to unpacked ones).
    model.config.restart_positions_per_document = False
    layout = model.packed_layout(input_ids, torch.tensor([[0] * 7 + [1] * 23]))
    assert layout.rope_positions.tolist() == [list(range(30))]
    continued, _ = model(input_ids, document_ids=torch.tensor([[0] * 7 + [1] * 23]))
    torch.testing.assert_close(continued, by_ids, rtol=1e-9, atol=1e-12)


def test_causal_threshold_update_counts_each_document_as_a_row():
    """Causal training: thresholds move toward the targets of the documents, each keeping its own k_d."""
    model = make_model("pure_mosa", sparsity=4)
    layer = model.mosa_layers[0]
    logits = torch.randn(1, 30, layer.num_heads, dtype=torch.float64)
    layout = document_layout(torch.tensor([[0] * 12 + [1] * 18]))
    layer.set_threshold_momentum(0.5)
    layer.update_causal_threshold(logits, documents=layout)
    packed = layer.causal_threshold.clone()
    rows = torch.zeros(2, 18, layer.num_heads, dtype=torch.float64)
    rows[0, :12], rows[1] = logits[0, :12], logits[0, 12:]
    mask = torch.zeros(2, 18, dtype=torch.bool)
    mask[0, :12], mask[1] = True, True
    layer.set_threshold_momentum(0.5)
    layer.update_causal_threshold(rows, attention_mask=mask)
    torch.testing.assert_close(packed, layer.causal_threshold)


@pytest.mark.parametrize("call, match", [
    (lambda m, ids: m(ids, document_ids=torch.tensor([[0, 0, 1, 0]])), "non-decreasing"),
    (lambda m, ids: m(ids, document_ids=torch.zeros(1, 3, dtype=torch.long)), "shape"),
    (lambda m, ids: m(ids, document_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4, dtype=torch.bool)),
     "not both"),
    (lambda m, ids: m(ids, document_ids=torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4])),
     "not both"),
    (lambda m, ids: m(ids.expand(2, -1), cu_seqlens=torch.tensor([0, 4])), "one flattened row"),
])
def test_bad_document_arguments(call, match):
    model = make_model("mosa", sparsity=4, num_dense_heads=2)
    with pytest.raises(ValueError, match=match):
        call(model, torch.zeros(1, 4, dtype=torch.long))


def test_routing_baseline_refuses_documents():
    model = make_model("routing", sparsity=4, num_dense_heads=2)
    with pytest.raises(ValueError, match="RoutingAttention does not take packed documents"):
        model(torch.zeros(1, 8, dtype=torch.long), document_ids=torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("attention,extra", [
    pytest.param("mosa", dict(sparsity=8, num_dense_heads=2, capacity=None), id="mosa"),
    pytest.param("fixed", dict(sparsity=8, num_dense_heads=2), id="fixed")])
def test_prepared_layout_traces_as_one_graph(attention, extra):
    """A layout from model.document_layout (its host reads made outside the call) lets torch.compile(fullgraph=True)
    trace a packed batch (the eager backend keeps it cheap), matching eager, for layouts of different widths."""
    extra = {key: value for key, value in extra.items() if value is not None}
    torch._dynamo.reset()
    model = make_model(attention, **extra).float()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids = torch.randint(0, VOCAB, (2, 96))
    for lengths in ([40, 56], [10, 40, 46], [96]):
        document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).expand(2, -1)
        layout = model.document_layout(ids, document_ids=document_ids)
        expected, _ = model(ids, document_ids=document_ids)
        got, _ = compiled(ids, documents=layout)
        torch.testing.assert_close(got, expected)


def test_selection_width_is_padded_to_a_multiple_of_eight():
    """The packed selection width is rounded up (few distinct widths under torch.compile), never past T, and the
    padding slots change nothing (the packed-vs-alone tests above run with it)."""
    from torch_mosa.ops.documents import SELECTION_WIDTH_MULTIPLE

    layout = document_layout(torch.tensor([[0] * 40 + [1] * 56]))
    assert layout.selection_sizes(8, None)[1] == 16  # k_d = 5 + 7 = 12, rounded up to 16
    assert SELECTION_WIDTH_MULTIPLE == 8
    short = document_layout(torch.tensor([[0, 0, 1, 2, 2]]))
    assert short.selection_sizes(8, None)[1] == 5  # k_d = 2 + 1 + 2 = 5: rounded to 8, capped at T = 5


def test_documents_and_document_ids_are_exclusive():
    model = make_model("mosa", sparsity=8, num_dense_heads=2)
    ids = torch.randint(0, VOCAB, (1, 12))
    document_ids = torch.zeros(1, 12, dtype=torch.long)
    with pytest.raises(ValueError, match="not more than one"):
        model(ids, document_ids=document_ids, documents=model.document_layout(ids, document_ids=document_ids))
    with pytest.raises(ValueError, match="documents describes"):
        model(ids[:, :6], documents=model.document_layout(ids, document_ids=document_ids))
