"""MoSAConfig and MoSAForCausalLM for transformers: config round trip, logits equal torch_mosa's, loss, safe loading."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import torch_mosa.hf as mosa_hf  # noqa: E402
from torch_mosa.hf.modeling import CACHE_KEY  # noqa: E402
from torch_mosa.inference.decode import prefilled_cache  # noqa: E402

from .conftest import VOCAB, micro_lm  # noqa: E402


def test_config_round_trip_and_readable_json(exported):
    model, folder = exported
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "mosa" and saved["attention"] == model.config.attention
    assert saved["num_sparse_heads"] == model.config.num_sparse_heads  # resolved, not null
    assert saved["routing"] == "causal" and saved["tie_word_embeddings"] is False
    loaded = transformers.AutoConfig.from_pretrained(folder)
    assert isinstance(loaded, mosa_hf.MoSAConfig) and loaded.to_mosa_config() == model.config
    assert loaded.num_hidden_layers == 2 and loaded.max_position_embeddings == 64


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="attention"):
        mosa_hf.MoSAConfig(attention="sparse")
    with pytest.raises(ValueError, match="routing"):
        mosa_hf.MoSAConfig(routing="nearest")
    with pytest.raises(TypeError, match="torch_mosa.MoSAConfig"):
        mosa_hf.MoSAConfig.from_mosa_config({"attention": "dense"})


@pytest.mark.parametrize("routing", ["causal", "topk"])
def test_auto_model_logits_equal_torch_mosa(exported, routing):
    model, folder = exported
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(loaded, mosa_hf.MoSAForCausalLM) and not loaded.training
    input_ids = torch.randint(0, VOCAB, (2, 40))
    mask = torch.ones_like(input_ids)
    mask[1, :7] = 0
    expected, _ = model(input_ids, attention_mask=mask, routing=routing)
    with torch.no_grad():
        got = loaded(input_ids, attention_mask=mask, routing=routing, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if routing == "causal":  # the default forward in eval mode fills a cache: torch_mosa's prefill
        expected, _ = prefilled_cache(model, input_ids, model.config.max_seq_len, mask)
        with torch.no_grad():
            out = loaded(input_ids, attention_mask=mask)
        assert isinstance(getattr(out, CACHE_KEY), mosa_hf.MoSACache)
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)


def test_cached_forward_equals_full_forward_and_continues():
    model = micro_lm("mosa")
    wrapped = mosa_hf.MoSAForCausalLM.from_mosa(model)
    input_ids = torch.randint(0, VOCAB, (2, 30))
    expected, _ = model(input_ids, routing="causal")
    with torch.no_grad():
        first = wrapped(input_ids[:, :20], use_cache=True)
        cache = getattr(first, CACHE_KEY)
        rest = wrapped(input_ids[:, 20:], cache=cache)
    assert isinstance(cache, mosa_hf.MoSACache)
    assert cache.get_seq_length() == 30 and len(cache) == 2
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), expected, rtol=0, atol=1e-5)


def test_the_cache_under_either_name():
    """transformers 5.24 renamed the cache argument past_key_values -> cache; the forward takes either (the same
    object under both is fine, two different ones are an error) and returns it in the field of the installed
    release (CACHE_KEY)."""
    model = micro_lm("mosa")
    wrapped = mosa_hf.MoSAForCausalLM.from_mosa(model)
    input_ids = torch.randint(0, VOCAB, (1, 12))
    expected, _ = model(input_ids, routing="causal")
    logits = []
    for name in ("cache", "past_key_values"):
        cache = mosa_hf.MoSACache(wrapped.model, 1, 16)
        with torch.no_grad():
            first = wrapped(input_ids[:, :8], **{name: cache})
            rest = wrapped(input_ids[:, 8:], cache=cache, past_key_values=cache)
        assert getattr(first, CACHE_KEY) is cache and cache.get_seq_length() == 12
        logits.append(torch.cat([first.logits, rest.logits], dim=1))
    for got in logits:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        wrapped(input_ids, cache=mosa_hf.MoSACache(wrapped.model, 1, 16),
                past_key_values=mosa_hf.MoSACache(wrapped.model, 1, 16))


def test_labels_give_the_shifted_loss():
    model = micro_lm("mosa")
    wrapped = mosa_hf.MoSAForCausalLM.from_mosa(model)
    input_ids = torch.randint(0, VOCAB, (2, 16))
    labels = input_ids.clone()
    labels[0, :4] = -100
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    for routing in ("topk", "causal"):
        _, expected = model(input_ids, targets=targets, routing=routing)
        out = wrapped(input_ids, labels=labels, routing=routing, use_cache=False)
        torch.testing.assert_close(out.loss, expected)
    cached = wrapped(input_ids, labels=labels, use_cache=True)
    torch.testing.assert_close(cached.loss, model(input_ids, targets=targets, routing="causal")[1])
    wrapped.train()
    out = wrapped(input_ids, labels=labels, routing="topk")
    assert getattr(out, CACHE_KEY) is None and out.loss.requires_grad
    out.loss.backward()
    assert wrapped.model.lm_head.weight.grad is not None


def test_forward_errors_name_the_argument():
    wrapped = mosa_hf.MoSAForCausalLM.from_mosa(micro_lm("mosa"))
    input_ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="inputs_embeds"):
        wrapped(input_ids, inputs_embeds=torch.zeros(1, 8, 64))
    with pytest.raises(TypeError, match=r"cache \(cache, past_key_values\) must be a torch_mosa.hf.MoSACache"):
        wrapped(input_ids, cache=transformers.DynamicCache())
    with pytest.raises(ValueError, match="routing='topk' cannot use a KV cache"):
        wrapped(input_ids, cache=mosa_hf.MoSACache(wrapped.model, 1, 16), routing="topk")
    with pytest.raises(ValueError, match="labels"):
        wrapped(input_ids, labels=input_ids[:, :4])
    with pytest.raises(ValueError, match="batch size"):
        wrapped(torch.randint(0, VOCAB, (2, 8)), cache=mosa_hf.MoSACache(wrapped.model, 1, 16))
    with pytest.raises(ValueError, match="max_seq_len"):
        mosa_hf.MoSACache(wrapped.model, 1, 65)


def test_missing_weights_file_is_a_clear_error(exported_mosa):
    _, folder = exported_mosa
    (folder / "model.safetensors").unlink()
    with pytest.raises(mosa_hf.ModelFolderError, match="has no model.safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file_is_a_clear_error(exported_mosa, damage):
    _, folder = exported_mosa
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00\xff" * 64)
    with pytest.raises(mosa_hf.ModelFolderError, match="model.safetensors' is corrupt"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_weights_that_do_not_fit_are_refused(exported_mosa):
    _, folder = exported_mosa
    weights = load_file(folder / "model.safetensors")
    del weights["model.lm_head.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not fit.*lm_head"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_pickled_weights_are_refused_never_unpickled(exported_mosa, monkeypatch):
    model, folder = exported_mosa
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called: pickled weights were opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(mosa_hf.ModelFolderError, match="pickled weights.*pytorch_model.bin"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="use_safetensors=False"):
        mosa_hf.MoSAForCausalLM.from_pretrained(folder, use_safetensors=False)


def test_core_package_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, torch_mosa, torch_mosa.inference, torch_mosa.models; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_from_mosa_copies_weights_and_config():
    model = micro_lm("fixed")
    wrapped = mosa_hf.MoSAForCausalLM.from_mosa(model, routing="topk")
    assert wrapped.config.routing == "topk" and wrapped.config.to_mosa_config() == model.config
    assert all(torch.equal(a, b) for a, b in zip(wrapped.model.state_dict().values(), model.state_dict().values()))
    with pytest.raises(TypeError, match="MoSALM"):
        mosa_hf.MoSAForCausalLM.from_mosa(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_packed_rows_from_position_ids_equal_each_document_alone(routing):
    """transformers' flattened packing (position_ids restarting at 0 per example) routes and attends per document:
    the packed row's logits and loss equal each document's alone."""
    model = micro_lm("mosa")
    wrapped = mosa_hf.MoSAForCausalLM.from_mosa(model)
    lengths = [1, 9, 23]
    input_ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = input_ids.clone()
    labels[0, [0, 1, 10]] = -100  # as DataCollatorWithFlattening: no label for each document's first token
    with torch.no_grad():
        packed = wrapped(input_ids, position_ids=position_ids, labels=labels, routing=routing, use_cache=False)
        alone, start = [], 0
        for n in lengths:
            alone.append(model(input_ids[:, start:start + n], routing=routing)[0])
            start += n
    torch.testing.assert_close(packed.logits, torch.cat(alone, 1), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(packed.loss)


@pytest.mark.parametrize("kwargs, match", [
    (dict(position_ids=torch.tensor([[0, 1, 3, 4]])), "restart at 0"),
    (dict(position_ids=torch.tensor([[0, 1, 0, 1]]), document_ids=torch.tensor([[0, 0, 1, 1]])), "not both"),
    (dict(position_ids=torch.tensor([[0, 1, 0, 1]]), use_cache=True), "no KV cache"),
    (dict(position_ids=torch.tensor([[0, 1, 0, 1]]), attention_mask=torch.tensor([[0, 1, 1, 1]])), "no padding"),
    (dict(inputs_embeds=torch.zeros(1, 4, 64)), "inputs_embeds"),
])
def test_packed_input_errors(kwargs, match):
    wrapped = mosa_hf.MoSAForCausalLM.from_mosa(micro_lm("mosa"))
    with pytest.raises(ValueError, match=match):
        wrapped(torch.zeros(1, 4, dtype=torch.long), **kwargs)
