"""Causal routing, the sparse KV cache and generation (SPEC §5)."""

import pytest
import torch

from torch_mosa import MoSAConfig, MoSALM
from torch_mosa.inference import calibrate_causal_thresholds, decode_one_token, new_cache, prefill

VOCAB = 61
CAUSAL_KINDS = ["dense", "mosa", "pure_mosa", "fixed", "local"]


def model_for(attention, **overrides):
    config = MoSAConfig.from_preset("micro", attention=attention, sparsity=None if attention == "dense" else 4,
                                    vocab_size=VOCAB, **overrides)
    model = MoSALM(config).double().eval()
    if model.mosa_layers:
        calibrate_causal_thresholds(model, [torch.randint(0, VOCAB, (2, 48))])
    return model


@pytest.mark.parametrize("attention", CAUSAL_KINDS)
def test_strict_causality(attention):
    """Changing tokens after t never changes logits at or before t (exact equality)."""
    model = model_for(attention)
    ids = torch.randint(0, VOCAB, (2, 40))
    base, _ = model(ids, routing="causal")
    for t in (0, 7, 23, 38):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, VOCAB, changed[:, t + 1:].shape)
        logits, _ = model(changed, routing="causal")
        assert torch.equal(logits[:, :t + 1], base[:, :t + 1]), f"position {t}"


def test_topk_routing_is_not_causal():
    """The paper's expert-choice top-k is documented as non-causal: later tokens change earlier outputs."""
    model = model_for("mosa")
    ids = torch.randint(0, VOCAB, (4, 64))
    base, _ = model(ids)
    changed = ids.clone()
    changed[:, 32:] = torch.randint(0, VOCAB, (4, 32))
    logits, _ = model(changed)
    assert not torch.allclose(logits[:, :32], base[:, :32])


@pytest.mark.parametrize("attention", CAUSAL_KINDS)
def test_cached_decode_equals_full_causal_forward(attention):
    model = model_for(attention, window=8) if attention == "local" else model_for(attention)
    ids = torch.randint(0, VOCAB, (2, 45))
    full, _ = model(ids, routing="causal")
    cache = new_cache(model, 2, 45, torch.float64, ids.device)
    prompt_logits = prefill(model, ids[:, :11], torch.ones(2, 11, dtype=torch.bool), cache)
    torch.testing.assert_close(prompt_logits, full[:, :11], rtol=1e-10, atol=1e-10)
    for t in range(11, 45):
        torch.testing.assert_close(decode_one_token(model, ids[:, t:t + 1], t, cache), full[:, t],
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", ["dense", "mosa", "local"])
def test_left_padded_batch_generates_like_single_prompts(attention):
    model = model_for(attention)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (9, 4)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = True
    batched = model.generate(ids, 12, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 12)
        assert torch.equal(batched[row, width:], alone[0, len(prompt):])


def test_cache_size_matches_formula_and_bytes():
    """KV pairs = T * H_dense + sum of tokens each MoSA head selected, per sequence and layer (SPEC §5)."""
    model = model_for("mosa")
    ids = torch.randint(0, VOCAB, (3, 50))
    out, cache = model.generate(ids, 10, return_cache=True)
    total_len = 59  # 50 prompt tokens + 9 decoded (the 10th sampled token is never fed back)
    dense_heads = model.config.head_counts()["dense"]
    mosa_pairs = sum(int(layer.sparse.counts.sum()) for layer in cache)
    assert cache.pairs() == 3 * model.config.num_layers * total_len * dense_heads + mosa_pairs
    assert cache.bytes_held() == 2 * cache.pairs() * model.config.head_dim * 8
    assert sum(layer.dense.k.nbytes + layer.dense.v.nbytes + layer.sparse.k.nbytes + layer.sparse.v.nbytes
               for layer in cache) == cache.bytes_allocated()
    # the sparse part holds about k = T/sparsity tokens per head (calibrated), far fewer than a dense head
    per_head = mosa_pairs / (3 * model.config.num_layers * model.config.num_sparse_heads)
    assert 0.05 * total_len < per_head < 0.6 * total_len


def test_uncalibrated_is_detected():
    from torch_mosa.inference.calibrate import uncalibrated

    model = MoSALM(MoSAConfig.from_preset("micro", attention="mosa", sparsity=8, vocab_size=VOCAB)).eval()
    assert uncalibrated(model)
    calibrate_causal_thresholds(model, [torch.randint(0, VOCAB, (2, 64))])
    assert not uncalibrated(model)
    aux = MoSAConfig.from_preset("micro", attention="mosa", sparsity=8, vocab_size=VOCAB, router_aux_loss_weight=0.1)
    assert not uncalibrated(MoSALM(aux))  # threshold 0 is the natural one for a router trained on membership


def test_calibration_hits_topk_rate():
    model = MoSALM(MoSAConfig.from_preset("micro", attention="mosa", sparsity=8, vocab_size=VOCAB)).eval()
    ids = torch.randint(0, VOCAB, (4, 128))
    report = calibrate_causal_thresholds(model, [ids])
    for layer in report:
        assert abs(layer["kept_fraction"] - layer["target_fraction"]) < 0.02


def test_greedy_and_seeded_generation_are_deterministic():
    model = model_for("mosa")
    ids = torch.randint(0, VOCAB, (2, 6))
    assert torch.equal(model.generate(ids, 8), model.generate(ids, 8))
    sampled = model.generate(ids, 8, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    assert torch.equal(sampled, model.generate(ids, 8, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=3))


def test_stop_tokens_end_generation():
    model = model_for("dense")
    ids = torch.randint(0, VOCAB, (1, 5))
    first = model.generate(ids, 1)[0, -1].item()
    out = model.generate(ids, 20, stop_tokens=[first])
    assert out.shape == (1, 6) and out[0, -1] == first


def test_router_aux_loss_is_added_in_training():
    config = MoSAConfig.from_preset("micro", attention="mosa", sparsity=4, vocab_size=VOCAB, router_aux_loss_weight=0.5)
    model = MoSALM(config)
    ids = torch.randint(0, VOCAB, (2, 32))
    model.train()
    _, loss = model(ids, ids)
    aux = model.last_router_aux_loss
    model.eval()
    _, plain = model(ids, ids)
    torch.testing.assert_close(loss, plain + 0.5 * aux)
    loss.backward()
    assert model.mosa_layers[0].router.weight.grad.abs().sum() > 0
    model.train()
    with torch.no_grad():  # e.g. a validation pass left in training mode: no aux loss, no error
        torch.testing.assert_close(model(ids, ids)[1], plain)


@pytest.mark.parametrize("call,match", [
    (lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), 4), "empty"),
    (lambda m: m.generate(torch.zeros(1, 250, dtype=torch.long), 10), "max_seq_len"),
    (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), -1), "max_new_tokens"),
    (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), 2, do_sample=True, temperature=0.0), "temperature"),
    (lambda m: m.generate(torch.zeros(2, 4, dtype=torch.long), 2,
                          attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])), "LEFT-padded"),
    (lambda m: m(torch.zeros(1, 4, dtype=torch.long), routing="greedy"), "routing"),
])
def test_bad_generation_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(model_for("mosa"))


def test_routing_attention_cannot_generate():
    model = MoSALM(MoSAConfig.from_preset("micro", attention="routing", sparsity=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="no causal mode"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 2)
