"""The decode step captured as one CUDA graph, optionally compiled first (gpt-fast's
torch.compile(mode="reduce-overhead"), done in two explicit steps so it works the same on every torch version).

A decode step launches hundreds of small kernels: replaying them as a graph removes the CPU launch overhead that
bounds small-batch decoding, and compiling the step with Inductor first fuses its elementwise work (RoPE, masks,
cache bookkeeping) into fewer kernels, which the graph alone cannot remove.
"""

from __future__ import annotations

import torch

from torch_mosa.inference.cache import ModelCache
from torch_mosa.inference.decode import decode_one_token


class GraphedStep:
    """`decode(tokens [B, 1], position [1]) -> logits [B, vocab]` captured once.

    The warm-up calls (which also compile a compiled `decode`) run on a side stream, as graph capture requires.
    `step(tokens, position)` copies its inputs into static buffers and replays; the logits it returns are a static
    buffer the next call overwrites.
    """

    @torch.no_grad()
    def __init__(self, decode, batch: int, device, warmup_steps: int = 2):
        if torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got device={device}")
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                decode(self.tokens, self.position)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode(self.tokens, self.position)

    def __call__(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.position.copy_(position)
        self.graph.replay()
        return self.logits


def compiled_decode(decode):
    """`decode` compiled by Inductor for replay in a graph: one whole graph (fullgraph), static shapes."""
    return torch.compile(decode, fullgraph=True, dynamic=False)


class GraphedDecodeStep(GraphedStep):
    """decode_one_token(model, tokens, position, cache) for one fixed cache, captured once (compiled by Inductor
    first with compile=True).

    Build it on a fresh cache BEFORE the prefill: the warm-up steps that capture needs write into the cache, so it is
    reset afterwards (the buffers stay where the graph points).
    """

    def __init__(self, model, cache: ModelCache, batch: int, device, warmup_steps: int = 2, compile: bool = False):
        step = compiled_decode(decode_one_token) if compile else decode_one_token
        super().__init__(lambda tokens, position: step(model, tokens, position, cache), batch, device, warmup_steps)
        cache.reset()
