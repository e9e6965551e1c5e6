"""What causal inference costs, measured on real runs: KV-cache footprint and decode speed (SPEC §5)."""

from __future__ import annotations

import time

import torch

from torch_mosa.inference.decode import decode_one_token, prefilled_cache


@torch.no_grad()
def kv_cache_footprint(model, input_ids: torch.Tensor) -> dict:
    """Prefill input_ids [B, T] under causal routing and count what the caches hold.

    Returns pairs_per_sequence (the paper's T*H_dense + sum of MoSA-selected tokens, summed over layers),
    pairs_per_token, bytes_per_token (keys and values in the cache dtype) and bytes_allocated.
    """
    batch, seq_len = input_ids.shape
    _, cache = prefilled_cache(model, input_ids, seq_len)
    return {"seq_len": seq_len, "pairs_per_sequence": cache.pairs() / batch,
            "pairs_per_token": cache.pairs() / (batch * seq_len),
            "bytes_per_token": cache.bytes_held() / (batch * seq_len),
            "bytes_allocated": cache.bytes_allocated()}


@torch.no_grad()
def decode_tokens_per_second(model, prompt_ids: torch.Tensor, new_tokens: int, warmup_tokens: int = 4) -> float:
    """Greedy decode throughput (tokens per second over the batch) after a prefill of prompt_ids [B, T].

    The first `warmup_tokens` decode steps are not timed; CUDA is synchronized around the timed steps.
    """
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + warmup_tokens + new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt {prompt_len} + {warmup_tokens} warm-up + {new_tokens} new tokens exceeds "
                         f"max_seq_len={model.config.max_seq_len}")
    logits, cache = prefilled_cache(model, prompt_ids, total)
    token = logits[:, -1:].argmax(-1)
    position = torch.tensor([prompt_len], device=prompt_ids.device)  # on the device: the loop never syncs

    def decode(token, count):
        for _ in range(count):
            token = decode_one_token(model, token, position, cache).argmax(-1, keepdim=True)
            position.add_(1)
        return token

    token = decode(token, warmup_tokens)
    if prompt_ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    decode(token, new_tokens)
    if prompt_ids.is_cuda:
        torch.cuda.synchronize()
    return batch * new_tokens / (time.perf_counter() - start)
