"""Decode throughput (issue 11): greedy tokens/s after a prompt, for torch-mosa models beside a yardstick.

The yardstick is a plain dense GPT decoder as gpt-fast writes it: one static KV cache per layer, RoPE from a
precomputed table, one SDPA call per layer per token. It shares the weights of torch-mosa's dense model of the same
shape, so both compute the same logits (tests/bench/test_decode.py checks it) and only the implementation differs.

MoSA models have random weights; their thresholds are calibrated on random tokens (so each head keeps about
T/sparsity of them) and their causal limits set by `suggested_causal_limits` for the decoded length; joins the limits
dropped are reported.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from torch_mosa.config import MoSAConfig
from torch_mosa.inference.calibrate import calibrate_causal_thresholds
from torch_mosa.inference.decode import decode_one_token, new_cache, prefill
from torch_mosa.inference.graphs import GraphedDecodeStep, GraphedStep, compiled_decode
from torch_mosa.inference.limits import set_causal_limits, suggested_causal_limits
from torch_mosa.models import MoSALM
from torch_mosa.ops.dispatch import fast_path
from torch_mosa.ops.rope import rope_cos_sin

# name -> MoSAConfig overrides of the preset: the three torch-mosa models
DECODE_MODELS = {
    "dense": dict(attention="dense"),
    "mosa 4+17 s32": dict(attention="mosa", sparsity=32, num_sparse_heads=17),
    "mosa IsoFLOP s64": dict(attention="mosa", sparsity=64),
}


class _StaticKV(nn.Module):
    """One layer's static cache as gpt-fast keeps it: registered k, v buffers [B, H, max_len, d].

    One pair of buffers per layer, not one [layers, ...] tensor indexed per layer: under torch.compile an in-place
    update of a view of a larger graph input is written back by copying the whole base, every layer of every step
    (at B=32 that made the yardstick 3x slower than torch-mosa dense, benchmarks/results/decode-b32-h100-*-1632.md)."""

    def __init__(self, batch: int, num_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, num_heads, max_len, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros_like(self.k))


class Yardstick(nn.Module):
    """A plain dense GPT decoder with a preallocated static KV cache per layer, on the weights of a dense MoSALM.

    prefill(input_ids [B, T]) -> logits [B, T, V]; decode(tokens [B, 1], position [1]) -> logits [B, V]."""

    def __init__(self, model: MoSALM, batch: int, max_len: int):
        super().__init__()
        config = model.config
        if config.attention != "dense":
            raise ValueError(f"the yardstick is a dense GPT: give a dense model, got attention={config.attention!r}")
        self.model = model
        weight = model.lm_head.weight
        self.caches = nn.ModuleList(_StaticKV(batch, config.num_heads, max_len, config.head_dim, weight.dtype,
                                              weight.device) for _ in range(config.num_layers))
        attn = model.blocks[0].attn
        self.rotary_dim = attn.rotary_dim
        cos, sin = rope_cos_sin(torch.arange(max_len, device=weight.device), attn.rotary_dim, attn.rope_base,
                                weight.dtype)
        self.cos, self.sin = cos, sin
        self.causal = torch.ones(max_len, max_len, dtype=torch.bool, device=weight.device).tril()

    def _rope(self, x, positions):
        r = self.rotary_dim
        cos, sin = self.cos[positions], self.sin[positions]
        rot = x[..., :r]
        first, second = rot.chunk(2, dim=-1)
        return torch.cat([rot * cos + torch.cat([-second, first], dim=-1) * sin, x[..., r:]], dim=-1)

    def _forward(self, input_ids, positions):
        config = self.model.config
        batch, seq_len = input_ids.shape
        mask = self.causal[positions][None, None]  # [1, 1, T, max_len]
        x = self.model.embed(input_ids)
        for block, cache in zip(self.model.blocks, self.caches):
            attn = block.attn
            qkv = attn.w_qkv(block.attn_norm(x)).view(batch, seq_len, config.num_heads, 3 * config.head_dim)
            q, k, v = qkv.transpose(1, 2).split(config.head_dim, dim=-1)
            cache.k.index_copy_(2, positions, self._rope(k, positions))
            cache.v.index_copy_(2, positions, v)
            y = F.scaled_dot_product_attention(self._rope(q, positions), cache.k, cache.v, attn_mask=mask)
            x = x + attn.w_o(y.transpose(1, 2).reshape(batch, seq_len, -1))
            x = x + block.ffn(block.ffn_norm(x))
        return self.model.lm_head(self.model.final_norm(x))

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._forward(input_ids, torch.arange(input_ids.shape[1], device=input_ids.device))

    def decode(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens, position)[:, -1]


def build_model(name: str, preset: str, device, dtype, calibrate_batches: int = 4) -> MoSALM:
    """One of DECODE_MODELS with random weights, in `dtype`; MoSA thresholds calibrated on random tokens."""
    torch.manual_seed(0)
    config = MoSAConfig.from_preset(preset, **DECODE_MODELS[name])
    model = MoSALM(config).to(device=device, dtype=dtype).eval()
    if model.mosa_layers:
        set_causal_limits(model, **suggested_causal_limits(model, config.max_seq_len))
        ids = torch.randint(0, config.vocab_size, (calibrate_batches, config.max_seq_len), device=device)
        calibrate_causal_thresholds(model, ids.split(2))
    return model


@torch.no_grad()
def time_decode(model, batch: int, prompt_len: int, new_tokens: int, warmup_tokens: int = 8,
                cuda_graphs: bool = False, yardstick: bool = False, compile_step: bool = False) -> dict:
    """Greedy decode of `new_tokens` after a random prompt [batch, prompt_len] (and `warmup_tokens` untimed);
    with cuda_graphs each step is replayed as a CUDA graph, compiled by Inductor first with compile_step.

    Returns tokens_per_s (over the batch) and, for torch-mosa models, the cache's kv_pairs_per_token,
    kv_bytes_per_token (held), kv_bytes_allocated and the overflow counts."""
    config = model.config
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    max_len = prompt_len + warmup_tokens + new_tokens
    if max_len > config.max_seq_len:
        raise ValueError(f"prompt_len + warmup + new_tokens = {max_len} exceeds max_seq_len={config.max_seq_len}")
    if model.mosa_layers:  # cache slots sized for this run's length, not the calibration windows'
        set_causal_limits(model, **suggested_causal_limits(model, max_len))
    torch.manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)
    cache = None
    if yardstick:  # graphs are captured before the prefill, which then overwrites what the warm-up step wrote
        runner = Yardstick(model, batch, max_len)
        decode = compiled_decode(runner.decode) if compile_step else runner.decode
        step = GraphedStep(decode, batch, device) if cuda_graphs else decode
        logits = runner.prefill(prompt)
    else:
        cache = new_cache(model, batch, max_len, dtype, device)
        step = GraphedDecodeStep(model, cache, batch, device, compile=compile_step) if cuda_graphs else \
            (lambda tokens, position: decode_one_token(model, tokens, position, cache))
        logits = prefill(model, prompt, None, cache)
    token = logits[:, -1:].argmax(-1)
    position = torch.tensor([prompt_len], device=device)

    def run(token, count):
        for _ in range(count):
            token = step(token, position).argmax(-1, keepdim=True)
            position.add_(1)
        return token

    token = run(token, warmup_tokens)
    _synchronize(device)
    start = time.perf_counter()
    run(token, new_tokens)
    _synchronize(device)
    result = {"tokens_per_s": batch * new_tokens / (time.perf_counter() - start)}
    if cache is not None:
        tokens_held = batch * max_len
        result.update(kv_pairs_per_token=cache.pairs() / tokens_held, kv_bytes_per_token=cache.bytes_held() / tokens_held,
                      kv_bytes_allocated=cache.bytes_allocated(), overflow=cache.overflow())
    return result


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_decode_bench(batches=(1, 32), preset: str = "tiny", prompt_len: int = 256, new_tokens: int = 128,
                     cuda_graphs: bool = False, device="cuda", dtype=torch.bfloat16, models=tuple(DECODE_MODELS),
                     log=print, compile_step: bool = False, eager: bool = True,
                     reference_decode: bool = False) -> list[dict]:
    """Every model (and the yardstick, on the dense model's weights) at every batch size: eager (unless
    eager=False), with cuda_graphs graphed, with compile_step compiled by Inductor and graphed. With
    reference_decode the sparse models also run their decode step as the plain-PyTorch composition
    (`ops/decode/reference.py`) instead of the fused kernels, in rows named "<model> [reference decode]".
    Returns rows {model, batch, mode, tokens_per_s, ...}."""
    rows = []
    built = {name: build_model(name, preset, device, dtype) for name in dict.fromkeys(("dense", *models))}
    modes = [mode for mode, wanted in (("eager", eager), ("cuda graphs", cuda_graphs),
                                       ("compiled + cuda graphs", compile_step)) if wanted]
    for batch in batches:
        for mode in modes:
            graphs, compiled = mode != "eager", mode.startswith("compiled")
            entries = [("yardstick", built["dense"], True, True)] + [(name, built[name], False, True)
                                                                     for name in models]
            if reference_decode:
                entries += [(f"{name} [reference decode]", built[name], False, False) for name in models
                            if built[name].config.attention != "dense"]
            for name, model, is_yardstick, fused in entries:
                if compiled:  # a fresh compilation: the fused/reference choice is baked into the graph
                    torch._dynamo.reset()
                with fast_path(fused):
                    result = time_decode(model, batch, prompt_len, new_tokens, cuda_graphs=graphs,
                                         yardstick=is_yardstick, compile_step=compiled)
                row = {"model": name, "batch": batch, "mode": mode, **result}
                rows.append(row)
                log(f"decode {name} B={batch} {mode}: {result['tokens_per_s']:,.0f} tokens/s")
    return rows


def decode_markdown(rows, header_lines) -> str:
    """The decode table: tokens/s, ratios to the yardstick and to torch-mosa dense of the same batch and mode."""
    lines = list(header_lines) + ["", "| model | B | mode | tokens/s | vs yardstick | vs torch-mosa dense | "
                                      "KV pairs/token | KV bytes held/token (vs dense) | KV MiB allocated | "
                                      "overflow (capacity, heads/token) |",
                                      "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        same = {r["model"]: r for r in rows if r["batch"] == row["batch"] and r["mode"] == row["mode"]}
        yard, dense = same.get("yardstick"), same.get("dense")
        cells = [row["model"], str(row["batch"]), row["mode"], f"{row['tokens_per_s']:,.0f}",
                 f"{row['tokens_per_s'] / yard['tokens_per_s']:.2f}x" if yard else "-",
                 f"{row['tokens_per_s'] / dense['tokens_per_s']:.2f}x" if dense else "-"]
        if "kv_pairs_per_token" in row:
            ratio = f" ({row['kv_bytes_per_token'] / dense['kv_bytes_per_token']:.2f}x)" if dense else ""
            cells += [f"{row['kv_pairs_per_token']:.1f}", f"{row['kv_bytes_per_token']:,.0f}{ratio}",
                      f"{row['kv_bytes_allocated'] / 2 ** 20:.1f}",
                      f"{row['overflow']['capacity']}, {row['overflow']['heads_per_token']}"]
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
