"""Timing of one attention layer (dense SDPA, MoSA reference path, MoSA fast path) and of a tiny training step.

Every number is measured: median ms of forward+backward through `triton.testing.do_bench` after warm-up, on random
bf16 data, and peak MiB via torch.cuda.max_memory_allocated over one forward+backward (parameters, input and
gradients included).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from torch_mosa.config import MoSAConfig
from torch_mosa.layers import DenseAttention, HybridAttention
from torch_mosa.models import MoSALM
from torch_mosa.ops.dispatch import fast_path


@dataclass(frozen=True)
class Case:
    """One SPEC §6 case: a hybrid layer (num_dense_heads + num_mosa_heads of k tokens) vs `dense_heads` dense heads."""

    name: str
    hidden: int
    num_mosa_heads: int
    num_dense_heads: int
    k: int
    seq_len: int
    batch: int
    include_first: bool
    dense_heads: int


CASES = {
    "A": [Case("A", 512, 505, 4, 16, 1024, 64, True, 9)],
    "B": [Case("B", 512, 142, 4, 64, 1024, 64, True, 9)],
    "C": [Case("C", 1024, 381, 4, 16, 1024, 16, True, 9)],
    "D": [Case(f"D T={t}", 1024, 60, 0, 64, t, 1, False, 16) for t in (8192, 16384, 32768, 65536, 131072)],
}
HEAD_DIM = 64


def _layers(case: Case, device):
    mosa = HybridAttention(case.hidden, HEAD_DIM, num_mosa_heads=case.num_mosa_heads,
                           num_dense_heads=case.num_dense_heads, k=case.k, include_first=case.include_first)
    dense = DenseAttention(case.hidden, case.dense_heads, HEAD_DIM)
    return [m.to(device=device, dtype=torch.bfloat16) for m in (mosa, dense)]


def case_inputs(case: Case, device):
    """One layer step's random inputs for `case`: x [B, T, h] in bf16 (requiring its gradient) and an output
    gradient of the same shape."""
    x = torch.randn(case.batch, case.seq_len, case.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    return x, torch.randn_like(x)


def host_ms_per_step(layer, x, grad_y, steps: int = 30) -> float:
    """Milliseconds the host takes to issue one forward + backward (no synchronisation inside the loop): when it is
    near the GPU time, the layer waits on Python and launches rather than on kernels."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        layer(x).backward(grad_y)
    issued = (time.perf_counter() - start) / steps * 1e3
    torch.cuda.synchronize()
    return issued


def graph_step(step, leaves, warmup: int = 3):
    """Capture `step()` (a forward + backward, optionally an optimizer step) as a CUDA graph -> its replay.

    Warm-up runs first on a side stream (compilation, autotuning and caches happen outside the capture, as
    torch.cuda.graph requires). The gradients of `leaves` are set to None before the capture, so the captured
    backward allocates them from the graph's pool and every replay rewrites them instead of accumulating. Any host
    synchronisation inside `step` fails the capture, so this also checks that a step needs none.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_layer(layer, x, grad_y, warmup_ms=50, rep_ms=200, cuda_graph: bool = False) -> tuple[float, float]:
    """Median ms of forward+backward, and peak MiB of one forward+backward (run eagerly). cuda_graph: the step is
    captured once (`graph_step`) and its replays are timed, which takes the host's launches out of the time."""
    import triton.testing

    params = [p for p in layer.parameters()]

    def step():
        layer(x).backward(grad_y)

    step()
    torch.cuda.synchronize()
    for t in [x, *params]:
        t.grad = None
    # the graphs of the paths timed before hold their private memory pools until collected: free them first, or
    # they count in this path's peak (likely why session 13's graph run read 1.08x dense in case A, 0.98x without)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 20
    if cuda_graph:  # a replay rewrites the same gradient buffers: nothing to reset between replays
        ms = triton.testing.do_bench(graph_step(step, [x, *params]), warmup=warmup_ms, rep=rep_ms,
                                     return_mode="median")
    else:
        ms = triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=[x, *params],
                                     return_mode="median")
    for t in [x, *params]:
        t.grad = None
    return ms, peak


def run_case(case: Case, paths=("dense", "reference", "fast"), reference_max_seq_len=131072,
             compile_layers: bool = False, device="cuda", cuda_graphs: bool = False) -> dict:
    """{path: (ms, MiB) or None when skipped} for one case. compile_layers: every path's layer is timed through
    torch.compile (compiled afresh per path, since the fast-path switch is read once while tracing), which takes
    the host's Python overhead out of the eager step: SPEC §6 case C is bound by the host in eager mode
    (benchmarks/mosa_layer.md, session 7). cuda_graphs: every path's step is timed as a CUDA graph replay
    (`time_layer`), which also takes the launches out: case D stays bound by the host even compiled (session 12)."""
    device = torch.device(device)
    torch.manual_seed(0)
    mosa, dense = _layers(case, device)
    x, grad_y = case_inputs(case, device)
    results = {}
    for path in paths:
        if path == "reference" and case.seq_len > reference_max_seq_len:
            results[path] = None
            continue
        layer = dense if path == "dense" else mosa
        with fast_path(path == "fast"):
            if compile_layers:
                torch._dynamo.reset()
                layer = torch.compile(layer)
            results[path] = time_layer(layer, x, grad_y, cuda_graph=cuda_graphs)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def run_cases(names, paths=("dense", "reference", "fast"), reference_max_seq_len=131072, log=print,
              compile_layers: bool = False, cuda_graphs: bool = False) -> list:
    rows = []
    for name in names:
        for case in CASES[name]:
            result = run_case(case, paths, reference_max_seq_len, compile_layers, cuda_graphs=cuda_graphs)
            rows.append((case, result))
            log(format_row(case, result))
    return rows


def format_row(case: Case, result: dict) -> str:
    cells = []
    for path in ("dense", "reference", "fast"):
        value = result.get(path)
        cells.append("skipped" if value is None else f"{value[0]:.3f} ms {value[1]:.0f} MiB")
    return f"{case.name}: " + " | ".join(f"{p} {c}" for p, c in zip(("dense", "reference", "fast"), cells))


# The whole-model table of issue 10: Tiny, dense vs the IsoFLOP MoSA models and the paper's perplexity-matched one.
TRAIN_MODELS = {
    "dense": dict(attention="dense"),
    "MoSA sparsity 64 (4 + 505)": dict(attention="mosa", sparsity=64),
    "MoSA sparsity 16 (4 + 142)": dict(attention="mosa", sparsity=16),
    "MoSA 4 + 17, sparsity 32": dict(attention="mosa", sparsity=32, num_sparse_heads=17),
    # beyond issue 10's table: k = 256, the wide path (selections wider than the row kernels' tiles)
    "MoSA sparsity 4": dict(attention="mosa", sparsity=4),
}
# `mosa bench --train-models` names for TRAIN_MODELS' entries; the default times the first four (issue 10's table)
TRAIN_MODEL_IDS = dict(zip(("dense", "s64", "s16", "4+17", "s4"), TRAIN_MODELS))
DEFAULT_TRAIN_MODEL_IDS = ("dense", "s64", "s16", "4+17")


def packed_document_ids(batch: int, seq_len: int, documents: int, seed: int = 0) -> torch.Tensor:
    """Document ids [batch, seq_len] of rows packed with `documents` documents each, of random lengths (at least 1
    token; cut points drawn uniformly with a fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        cuts = torch.randperm(seq_len - 1, generator=generator)[:documents - 1] + 1
        ids[row, cuts] = 1
    return ids.cumsum(-1)


def training_step(model_kwargs: dict, batch: int = 64, compile_model: bool = True, preset: str = "tiny",
                  documents: int = 0, capturable: bool = False):
    """-> (step, config): `step()` runs one full training step of a preset model on random tokens [batch,
    max_seq_len] on CUDA (autocast bf16, fused AdamW, optionally torch.compile). documents > 0 packs that many
    documents of random lengths into each row, so the per-document routing and masks run too. capturable: the
    optimizer keeps its step count on the GPU, so the whole step can be captured as a CUDA graph."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = MoSAConfig.from_preset(preset, **model_kwargs)
    model = MoSALM(config).to(device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-4, fused=True, capturable=capturable)
    forward = torch.compile(model) if compile_model else model
    tokens = torch.randint(0, config.vocab_size, (batch, config.max_seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    packed = {} if not documents else {  # built outside the compiled model (see MoSALM.document_layout)
        "documents": model.document_layout(inputs, packed_document_ids(batch, config.max_seq_len, documents)
                                           .to(device))}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(inputs, targets, **packed)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # inside a captured step too: the gradients live in the graph's pool

    return step, config


def train_step_tokens_per_second(model_kwargs: dict, batch: int = 64, steps: int = 10, compile_model: bool = True,
                                 fast: bool = True, preset: str = "tiny", documents: int = 0,
                                 cuda_graph: bool = False) -> tuple[float, float]:
    """Full training steps of a preset model (`training_step`): (tokens/s from the median step, peak MiB).
    cuda_graph: the step (forward, backward and optimizer) is captured once and its replays are timed."""
    step, config = training_step(model_kwargs, batch, compile_model, preset, documents, capturable=cuda_graph)
    return time_training_step(step, batch * config.max_seq_len, steps, fast, cuda_graph)


def time_training_step(step, tokens_per_step: int, steps: int = 10, fast: bool = True,
                       cuda_graph: bool = False) -> tuple[float, float]:
    """(tokens/s from the median of `steps` timed steps after 3 untimed ones, peak MiB over the timed steps).
    cuda_graph: `step` is captured first (`graph_step`; it sets its own gradients to None) and replayed."""
    times = []
    with fast_path(fast):
        if cuda_graph:
            step = graph_step(step, [])
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    median_ms = sorted(times)[len(times) // 2]
    return tokens_per_step / (median_ms / 1e3), torch.cuda.max_memory_allocated() / 2 ** 20
