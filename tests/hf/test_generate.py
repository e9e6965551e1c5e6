"""HF generate() with the MoSA cache equals torch_mosa's own generate() token for token (greedy), for dense, hybrid
MoSA and fixed attention, with left-padded batches; sampling options, stop strings and refused modes."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch_mosa.hf as mosa_hf  # noqa: E402
from torch_mosa.hf.modeling import CACHE_KEY  # noqa: E402

from .conftest import VOCAB  # noqa: E402


def left_padded_prompts(pad_id: int):
    """Three prompts of 12, 5 and 9 tokens, left-padded to 12 -> (input_ids [3, 12], attention_mask [3, 12])."""
    lengths = (12, 5, 9)
    input_ids = torch.full((3, 12), pad_id)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, 12 - length:] = torch.randint(1, VOCAB, (length,))
        mask[row, 12 - length:] = 1
    return input_ids, mask


def test_greedy_equals_torch_mosa_generate(exported):
    model, folder = exported
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    input_ids, mask = left_padded_prompts(loaded.config.pad_token_id)
    ours = model.generate(input_ids, 20, attention_mask=mask)
    out = loaded.generate(input_ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None,
                          return_dict_in_generate=True)
    assert torch.equal(out.sequences, ours)
    assert len(set(ours[:, 12:].flatten().tolist())) > 8  # real continuations, not one repeated token
    cache = getattr(out, CACHE_KEY)  # `cache` from transformers 5.24, `past_key_values` before
    assert isinstance(cache, mosa_hf.MoSACache) and cache.get_seq_length() == 12 + 19
    # the cache HF generate filled is torch_mosa's: dense heads hold every real token (the padding too, in caches
    # that count it), sparse heads only their selections; pairs over 2 layers, as the paper counts them
    real_tokens = int(mask.sum()) + 3 * 19
    heads = sum(model.config.head_counts().values())
    if model.config.attention == "dense":
        assert 2 * real_tokens * heads <= cache.model_cache.pairs() <= 2 * 3 * 31 * heads
    else:
        assert 2 * real_tokens * model.config.num_dense_heads < cache.model_cache.pairs() < 2 * real_tokens * heads


def test_greedy_with_end_of_text_stops_like_torch_mosa(exported_mosa):
    """eos = pad = end-of-text: finished rows are padded with it in both, and both stop once every row finished."""
    model, folder = exported_mosa
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    input_ids, mask = left_padded_prompts(loaded.config.pad_token_id)
    ours = model.generate(input_ids, 24, attention_mask=mask)
    stop = ours[0, 16].item()  # a token the first row generates: that row stops there
    ours = model.generate(input_ids, 24, attention_mask=mask, stop_tokens=[stop])
    theirs = loaded.generate(input_ids, attention_mask=mask, max_new_tokens=24, eos_token_id=stop, pad_token_id=stop)
    assert torch.equal(theirs, ours)
    assert (ours[0, 16:] == stop).all()


def test_sampling_options(exported_mosa):
    _, folder = exported_mosa
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    input_ids, mask = left_padded_prompts(loaded.config.pad_token_id)
    greedy = loaded.generate(input_ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    # one candidate left: sampling must follow the greedy path through the cache
    for options in (dict(top_k=1), dict(top_p=1e-6, top_k=0)):
        sampled = loaded.generate(input_ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                                  eos_token_id=None, **options)
        assert torch.equal(sampled, greedy), options
    torch.manual_seed(1)
    first = loaded.generate(input_ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=2.0,
                            top_k=50, top_p=0.95, eos_token_id=None, num_return_sequences=2)
    torch.manual_seed(1)
    again = loaded.generate(input_ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=2.0,
                            top_k=50, top_p=0.95, eos_token_id=None, num_return_sequences=2)
    assert first.shape == (6, 22) and torch.equal(first, again)
    assert not torch.equal(first[::2], greedy)


def test_stop_strings(exported_mosa, tokenizer):
    _, folder = exported_mosa
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = hf_tokenizer(["It was a dark"], return_tensors="pt")
    full = loaded.generate(**prompt, max_new_tokens=16, eos_token_id=None)
    new = full[0, prompt.input_ids.shape[1]:].tolist()
    # a generated token that is whole text (random weights also produce partial UTF-8 byte tokens)
    stop_text = next(text for text in map(tokenizer.decode, ([t] for t in new[:-1]))
                     if text.strip() and text.isprintable() and "\ufffd" not in text)
    stopped = loaded.generate(**prompt, max_new_tokens=16, eos_token_id=None, stop_strings=[stop_text],
                              tokenizer=hf_tokenizer)
    text = hf_tokenizer.decode(stopped[0, prompt.input_ids.shape[1]:])
    assert stopped.shape[1] < full.shape[1] and text.endswith(stop_text)
    assert torch.equal(stopped[0], full[0, :stopped.shape[1]])


def test_refused_generation_modes_and_lengths(exported_mosa):
    _, folder = exported_mosa
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    input_ids = torch.randint(1, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="greedy decoding or sampling"):
        loaded.generate(input_ids, max_new_tokens=4, num_beams=2)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        loaded.generate(input_ids, max_new_tokens=60)
    with pytest.raises(ValueError, match="LEFT-padded"):
        cache = mosa_hf.MoSACache(loaded.model, 1, 16)
        loaded(input_ids, attention_mask=torch.tensor([[1] * 6 + [0] * 2]), cache=cache)
        loaded(input_ids[:, :1], cache=cache)
