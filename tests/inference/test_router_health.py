"""Router-health statistics against hand-computed selections, and their collection from a model's forward."""

import math

import pytest
import torch

from torch_mosa import MoSAConfig
from torch_mosa.inference.router_health import (head_pairs, head_selections, model_router_health, most_picked_tokens,
                                                record_selections, selection_health, tail_length)
from torch_mosa.layers.sparse import membership_selection
from torch_mosa.models.lm import MoSALM


def _values(health):
    return {name: value.item() for name, value in health.items()}


def test_two_heads_six_tokens_by_hand():
    # head 0 takes tokens {0, 1, 2}, head 1 takes {0, 4, 5}; token 3 is nobody's
    indices = torch.tensor([[[0, 1, 2], [0, 4, 5]]])
    scores = torch.tensor([[[0.9, 0.5, 0.7], [0.6, 0.8, 0.4]]])
    health = _values(selection_health(indices, scores, seq_len=6))
    taken = [0.9, 0.5, 0.7, 0.6, 0.8, 0.4]
    mean = sum(taken) / 6
    assert health["score_mean"] == pytest.approx(mean)
    assert health["score_std"] == pytest.approx(math.sqrt(sum((s - mean) ** 2 for s in taken) / 6))
    assert health["unchosen_frac"] == pytest.approx(1 / 6)
    assert health["heads_per_token"] == pytest.approx(6 / 6)
    assert health["jaccard"] == pytest.approx(1 / 5)  # {0} over {0, 1, 2, 4, 5}
    assert health["first_token_share"] == pytest.approx(2 / 6)  # token 0 in both heads
    assert tail_length(6) == 1
    assert health["tail_share"] == pytest.approx(1 / 6)  # token 5, in head 1
    assert "join_rate" not in health and "join_target" not in health  # top-k: no causal target


def test_padding_slots_and_padded_tokens_are_not_counted():
    # row of 6 positions whose first two are padding (left-padded); head 0 has an empty slot (score 0) pointing at
    # padded position 0, and the first real token is position 2
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    indices = torch.tensor([[[2, 3, 0], [2, 4, 5]]])
    scores = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.5]]])
    health = _values(selection_health(indices, scores, 6, mask))
    assert health["score_std"] == pytest.approx(0.0)
    assert health["unchosen_frac"] == pytest.approx(0.0)  # 4 real tokens, all taken
    assert health["heads_per_token"] == pytest.approx(5 / 4)
    assert health["first_token_share"] == pytest.approx(2 / 5)
    assert health["jaccard"] == pytest.approx(1 / 4)  # {2, 3} vs {2, 4, 5}


def test_identical_heads_overlap_fully_and_disjoint_heads_not_at_all():
    same = torch.tensor([[[1, 3], [1, 3], [1, 3]]])
    assert selection_health(same, torch.full((1, 3, 2), 0.7), 8)["jaccard"].item() == pytest.approx(1.0)
    apart = torch.tensor([[[0, 1], [2, 3], [4, 5]]])
    assert selection_health(apart, torch.full((1, 3, 2), 0.7), 8)["jaccard"].item() == pytest.approx(0.0)
    assert "jaccard" not in selection_health(same[:, :1], torch.ones(1, 1, 2), 8)  # one head: no pair


def test_causal_join_rate_against_its_target():
    # 2 heads over 10 tokens: head 0 joined 3 tokens, head 1 joined 1; the target keeps 2 of 10 per head
    joined = torch.zeros(1, 2, 10, dtype=torch.bool)
    joined[0, 0, [0, 4, 9]] = True
    joined[0, 1, 0] = True
    indices, scores = membership_selection(joined, torch.full((1, 2, 10), 0.6))
    health = _values(selection_health(indices, scores, 10, join_target=0.2))
    assert health["join_rate"] == pytest.approx(4 / 20)
    assert health["join_target"] == pytest.approx(0.2)
    assert health["unchosen_frac"] == pytest.approx(7 / 10)
    assert health["tail_share"] == pytest.approx(1 / 4)
    assert health["jaccard"] == pytest.approx(1 / 3)


def test_head_pairs_are_all_pairs_or_a_fixed_sample():
    assert head_pairs(3, 32).tolist() == [[0, 1], [0, 2], [1, 2]]
    sampled = head_pairs(100, 32)
    assert sampled.shape == (32, 2) and bool((sampled[:, 0] < sampled[:, 1]).all())
    assert len({tuple(p) for p in sampled.tolist()}) == 32
    head_pairs.cache_clear()
    assert torch.equal(head_pairs(100, 32), sampled)  # the same pairs every time, so curves compare over steps


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="indices and scores"):
        selection_health(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 4), 6)
    with pytest.raises(ValueError, match="max_pairs"):
        selection_health(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3), 6, max_pairs=0)


def _model(attention="mosa", **overrides):
    sizes = dict(num_layers=3, hidden_size=32, ffn_size=64, head_dim=8, max_seq_len=32, vocab_size=50)
    sparsity = None if attention == "dense" else 4
    return MoSALM(MoSAConfig.from_preset("micro", attention=attention, sparsity=sparsity, **{**sizes, **overrides}))


def test_model_health_is_recorded_only_when_asked_and_averages_the_layers():
    torch.manual_seed(0)
    model = _model()
    input_ids = torch.randint(0, 50, (2, 32))
    model(input_ids)
    assert model_router_health(model) == ({}, {})  # recording is off by default
    record_selections(model)
    logits_recorded, _ = model(input_ids)
    averaged, per_layer = model_router_health(model)
    assert len(per_layer) == 3 * 7  # 3 layers x 7 top-k metrics
    for name in ("score_mean", "unchosen_frac", "jaccard", "tail_share"):
        layer_values = [per_layer[f"router/layer{i}/{name}"] for i in range(3)]
        assert averaged[f"router_{name}"] == pytest.approx(sum(layer_values) / 3)
    assert all(math.isfinite(v) for v in per_layer.values())
    assert model_router_health(model) == ({}, {})  # collected selections are cleared
    record_selections(model, False)
    logits_plain, _ = model(input_ids)
    assert torch.equal(logits_recorded, logits_plain)  # recording changes nothing in the forward


def test_model_health_under_causal_routing_reports_the_join_rate():
    model = _model(num_layers=1)
    record_selections(model)
    model(torch.randint(0, 50, (2, 32)), routing="causal")
    averaged, _ = model_router_health(model)
    assert averaged["router_join_target"] == pytest.approx(8 / 32)  # k = 32 // 4
    assert 0.0 <= averaged["router_join_rate"] <= 1.0


def test_head_selections_and_most_picked_tokens():
    model = _model(num_layers=2)
    selections = head_selections(model, torch.randint(0, 50, (1, 16)))
    assert len(selections) == 2 and selections[0].indices.shape[-1] == 4
    assert not any(layer.record_selection for layer in model.mosa_layers)  # flags restored
    labels = ["a", "b"] * 8
    picked = most_picked_tokens(selections[0], labels, top=5)
    assert len(picked) == model.mosa_layers[0].num_heads
    assert all(sum(count for _, count in head) == 4 for head in picked)
    with pytest.raises(ValueError, match="token_labels"):
        most_picked_tokens(selections[0], labels[:3])


def test_head_selections_of_a_dense_model_is_a_clear_error():
    with pytest.raises(ValueError, match="no MoSA heads"):
        head_selections(_model(attention="dense"), torch.randint(0, 50, (1, 8)))
