"""Causal routing, the sparse KV cache and generation (SPEC §5)."""

import pytest
import torch

from torch_mosa import MoSAConfig, MoSALM
from torch_mosa.inference import calibrate_causal_thresholds, decode_one_token, new_cache, prefill, set_causal_limits
from torch_mosa.layers import MoSAAttention

VOCAB = 61
CAUSAL_KINDS = ["dense", "mosa", "pure_mosa", "fixed", "fixed-per-head", "local"]


def model_for(attention, **overrides):
    if attention == "fixed-per-head":  # the fixed-pattern control: head e strides from e mod sparsity
        attention, overrides = "fixed", {**overrides, "fixed_offsets": "per_head"}
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


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = True
    return ids, mask


@pytest.mark.parametrize("attention", CAUSAL_KINDS)
def test_left_padded_cached_decode_equals_full_causal_forward(attention):
    """Prompts of different lengths, left-padded: prefill + decode equals the full causal forward of the padded
    batch at every real position."""
    model = model_for(attention, window=8) if attention == "local" else model_for(attention)
    ids, mask = left_padded([torch.randint(0, VOCAB, (n,)) for n in (30, 17, 23)])
    full, _ = model(ids, attention_mask=mask, routing="causal")
    prompt_len = 19
    cache = new_cache(model, 3, ids.shape[1], torch.float64, ids.device)
    prompt_logits = prefill(model, ids[:, :prompt_len], mask[:, :prompt_len], cache)
    real = mask[:, :prompt_len]
    torch.testing.assert_close(prompt_logits[real], full[:, :prompt_len][real], rtol=1e-10, atol=1e-10)
    for t in range(prompt_len, ids.shape[1]):
        torch.testing.assert_close(decode_one_token(model, ids[:, t:t + 1], t, cache), full[:, t],
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", ["dense", "mosa"])
def test_dense_heads_share_one_real_token_mask(attention):
    """Every layer's dense-head cache reads one real-token mask and only the first writes it (one kernel per decode
    step, not one per layer); the left-padded decode tests above check the result is unchanged."""
    model = model_for(attention)
    cache = new_cache(model, 2, 12, torch.float64, "cpu")
    dense = [c for c in cache.caches() if type(c).__name__ == "DenseCache"]
    assert len(dense) == model.config.num_layers >= 2
    assert all(c.key_real is dense[0].key_real for c in dense)
    assert [c.marks_real for c in dense] == [True] + [False] * (len(dense) - 1)


def test_causal_limits_are_applied_alike_and_counted():
    """With a small capacity per head and few heads per token, joins are dropped: decode still equals the full causal
    forward (both apply the same rule), and the cache counts exactly the drops the full forward counts."""
    model = model_for("pure_mosa")
    set_causal_limits(model, capacity=5, heads_per_token=2)
    ids = torch.randint(0, VOCAB, (2, 40))
    full, _ = model(ids, routing="causal")
    expected = {key: sum(int(layer.last_causal_overflow[key]) for layer in model.mosa_layers)
                for key in ("capacity", "heads_per_token")}
    cache = new_cache(model, 2, 40, torch.float64, ids.device)
    prefill(model, ids[:, :9], None, cache)
    for t in range(9, 40):
        torch.testing.assert_close(decode_one_token(model, ids[:, t:t + 1], t, cache), full[:, t],
                                   rtol=1e-10, atol=1e-10)
    assert expected["capacity"] > 0 and expected["heads_per_token"] > 0
    assert cache.overflow() == expected
    assert all(int(layer.sparse.counts.max()) <= 5 for layer in cache)


def test_capacity_makes_the_causal_forward_narrow_and_still_causal(monkeypatch):
    """With a capacity the causal forward runs each head at that width instead of T, and stays causal bit for bit."""
    model = model_for("mosa")
    set_causal_limits(model, capacity=12)
    widths = []
    attend = MoSAAttention.attend
    monkeypatch.setattr(MoSAAttention, "attend",
                        lambda self, x, i, s, documents=None: widths.append(i.shape[-1]) or attend(self, x, i, s, documents))
    ids = torch.randint(0, VOCAB, (2, 40))
    base, _ = model(ids, routing="causal")
    assert set(widths) == {12}
    changed = ids.clone()
    changed[:, 21:] = torch.randint(0, VOCAB, (2, 19))
    assert torch.equal(model(changed, routing="causal")[0][:, :21], base[:, :21])


@pytest.mark.parametrize("attention", ["dense", "mosa", "local", "fixed", "fixed-per-head"])
def test_left_padded_batch_generates_like_single_prompts(attention):
    model = model_for(attention)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (9, 4)]
    width = max(len(p) for p in prompts)
    ids, mask = left_padded(prompts)
    batched = model.generate(ids, 12, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 12)
        assert torch.equal(batched[row, width:], alone[0, len(prompt):])


def test_cache_size_matches_formula_and_bytes():
    """KV pairs = T * H_dense + sum of tokens each MoSA head selected, per sequence and layer (SPEC §5)."""
    total_len = 59  # 50 prompt tokens + 9 decoded (the 10th sampled token is never fed back)
    model = model_for("mosa")
    calibrate_causal_thresholds(model, [torch.randint(0, VOCAB, (8, total_len))])  # at the length it will hold
    ids = torch.randint(0, VOCAB, (3, 50))
    out, cache = model.generate(ids, 10, return_cache=True)
    dense_heads = model.config.head_counts()["dense"]
    mosa_pairs = sum(int(layer.sparse.counts.sum()) for layer in cache)
    assert cache.pairs() == 3 * model.config.num_layers * total_len * dense_heads + mosa_pairs
    assert cache.bytes_held() == 2 * cache.pairs() * model.config.head_dim * 8
    assert sum(layer.dense.k.nbytes + layer.dense.v.nbytes + layer.sparse.k.nbytes + layer.sparse.v.nbytes
               for layer in cache) == cache.bytes_allocated()
    # calibrated, a MoSA head holds about the k tokens top-k would pick at this length (14 of 59), within 25%;
    # uncalibrated thresholds (0) keep about half of the tokens
    target = model.mosa_layers[0].selection_size(total_len)
    per_head = mosa_pairs / (3 * model.config.num_layers * model.config.num_sparse_heads)
    assert 0.75 * target <= per_head <= 1.25 * target, (per_head, target)


def test_uncalibrated_is_detected():
    from torch_mosa.inference.calibrate import uncalibrated

    model = MoSALM(MoSAConfig.from_preset("micro", attention="mosa", sparsity=8, vocab_size=VOCAB)).eval()
    assert uncalibrated(model)
    calibrate_causal_thresholds(model, [torch.randint(0, VOCAB, (2, 64))])
    assert not uncalibrated(model)
    aux = MoSAConfig.from_preset("micro", attention="mosa", sparsity=8, vocab_size=VOCAB, router_aux_loss_weight=0.1)
    assert not uncalibrated(MoSALM(aux))  # threshold 0 is the natural one for a router trained on membership


def test_calibration_on_padded_batches_keeps_the_target_rate():
    """Padding and the forced first real token are left out: on left- and right-padded batches of varied lengths the
    kept rate over real tokens is within 5% of what top-k keeps of each row."""
    model = MoSALM(MoSAConfig.from_preset("micro", attention="mosa", sparsity=8, vocab_size=VOCAB)).eval()
    lengths = [[128, 40, 77, 9], [100, 128, 16, 64]]
    batches = []
    for index, row_lengths in enumerate(lengths):
        ids, mask = left_padded([torch.randint(0, VOCAB, (n,)) for n in row_lengths])
        batches.append((ids, mask) if index == 0 else (ids.flip(1), mask.flip(1)))  # left, then right padding
    calibrate_causal_thresholds(model, batches)
    logits = {layer: [] for layer in model.mosa_layers}
    hooks = [layer.router.register_forward_hook(lambda m, a, out, layer=layer: logits[layer].append(out))
             for layer in model.mosa_layers]
    for ids, mask in batches:
        model(ids, attention_mask=mask, routing="causal")
    for hook in hooks:
        hook.remove()
    for layer in model.mosa_layers:
        kept = candidates = target = 0
        for (ids, mask), layer_logits in zip(batches, logits[layer]):
            candidate = mask.clone()
            candidate[torch.arange(len(mask)), mask.long().argmax(1)] = False  # the forced first real token
            kept += int((layer_logits > layer.causal_threshold)[candidate].sum())
            candidates += int(candidate.sum()) * layer.num_heads
            target += sum(layer.selection_size(n) - 1 for n in mask.sum(1).tolist()) * layer.num_heads
        assert abs(kept / target - 1) < 0.05, (kept, target, candidates)


def test_calibration_ties_keep_the_closer_count():
    """Tied logits (bf16) at the boundary: keep all of them or none, whichever is closer to the target."""
    from torch_mosa.inference.calibrate import _keep_threshold

    flat = torch.tensor([[3.0], [2.0], [2.0], [2.0], [1.0], [0.0]], dtype=torch.bfloat16)
    assert int((flat > _keep_threshold(flat, 3)).sum()) == 4  # 4 (all ties) is closer to 3 than 1
    assert int((flat > _keep_threshold(flat, 2)).sum()) == 1  # 1 is closer to 2 than 4
    assert int((flat > _keep_threshold(flat, 6)).sum()) == 6


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


@pytest.mark.parametrize("attention", ["dense", "mosa", "fixed", "local"])
def test_decode_step_traces_as_one_graph(attention):
    """torch.compile(fullgraph=True) traces the whole decode step (what GraphedDecodeStep(compile=True) compiles with
    Inductor on a GPU) and the traced steps equal the eager ones; the eager backend keeps it cheap here."""
    torch._dynamo.reset()
    config = MoSAConfig.from_preset("micro", attention=attention, sparsity=None if attention == "dense" else 4,
                                    vocab_size=64, window=8 if attention == "local" else None)
    model = MoSALM(config).double().eval()
    ids = torch.randint(0, 64, (2, 24))
    traced = torch.compile(decode_one_token, fullgraph=True, dynamic=False, backend="eager")
    with torch.no_grad():
        logits = []
        for step in (decode_one_token, traced):
            cache = new_cache(model, 2, 24, torch.float64, "cpu")
            prefill(model, ids[:, :16], None, cache)
            position = torch.tensor([16])
            logits.append(torch.stack([step(model, ids[:, t:t + 1], position.fill_(t), cache) for t in range(16, 24)]))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-12, atol=1e-12)
