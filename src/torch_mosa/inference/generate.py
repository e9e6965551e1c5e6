"""Generation: prefill the prompt, then decode token by token with causal routing and the sparse KV cache."""

from __future__ import annotations

import torch

from torch_mosa.inference.decode import decode_one_token, prefilled_cache


def sample(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B] (greedy unless do_sample)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_generate_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, seq_len] tensor of token ids")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: input_ids needs at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    limit = model.config.max_seq_len
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's context max_seq_len={limit}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}")
        if not attention_mask.bool()[:, -1].all():
            raise ValueError("batched prompts must be LEFT-padded: attention_mask[:, -1] must be 1 for every row")
        if not attention_mask.bool().any(dim=1).all():
            raise ValueError("a prompt in the batch is empty (attention_mask is all 0 in some row)")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=None, attention_mask=None,
             seed: int | None = None, return_cache: bool = False):
    """Generate up to max_new_tokens after input_ids [B, T] (left-padded batches with attention_mask).

    Returns [B, T + n] (n <= max_new_tokens: stops when every row produced a stop token; finished rows are
    filled with their stop token), and the ModelCache too with return_cache=True. Causal routing throughout:
    prefill uses the batched forward, decode the caches.
    """
    _check_generate_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    model.check_input_ids(input_ids)
    batch, prompt_len = input_ids.shape
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_tokens or [])), dtype=torch.long, device=input_ids.device)
    was_training = model.training
    model.eval()
    try:
        logits, cache = prefilled_cache(model, input_ids, prompt_len + max_new_tokens, attention_mask)
        logits = logits[:, -1]
        tokens = [input_ids]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        position = torch.tensor([prompt_len], device=input_ids.device)  # on the device: the loop never syncs
        for step in range(max_new_tokens):
            next_token = sample(logits, do_sample, temperature, top_k, top_p, generator)
            if stop.numel():
                next_token = torch.where(finished, tokens[-1][:, -1], next_token)
                finished = finished | torch.isin(next_token, stop)
            tokens.append(next_token.unsqueeze(1))
            if step == max_new_tokens - 1 or (stop.numel() and bool(finished.all())):
                break
            logits = decode_one_token(model, tokens[-1], position, cache)
            position += 1
    finally:
        model.train(was_training)
    output = torch.cat(tokens, dim=1)
    return (output, cache) if return_cache else output
