"""The benchmark package on a CPU machine: its cases match SPEC §6, its report is well formed, and `mosa bench`
refuses clearly without a GPU (the timings themselves only run on CUDA)."""

import pytest
import torch

from torch_mosa.bench.cases import CASES
from torch_mosa.bench.report import markdown_report
from torch_mosa.flops import isoflop_num_heads


def test_cases_are_the_spec_cases():
    a, = CASES["A"]
    assert (a.hidden, a.num_dense_heads, a.num_mosa_heads, a.k, a.seq_len, a.batch) == (512, 4, 505, 16, 1024, 64)
    assert a.num_mosa_heads == isoflop_num_heads(512, 64, 9, 1024, 64)
    b, = CASES["B"]
    assert (b.num_mosa_heads, b.k) == (142, 64)
    c, = CASES["C"]
    assert (c.hidden, c.num_mosa_heads, c.batch) == (1024, 381, 16)
    assert [d.seq_len for d in CASES["D"]][-1] == 131072 and all(d.k == 64 for d in CASES["D"])


def test_report_table_has_ratios_and_skips():
    a, = CASES["A"]
    report = markdown_report([(a, {"dense": (2.0, 100.0), "reference": None, "fast": (3.0, 150.0)})],
                             train_rows=[("dense", 16, 1e5, 4000.0)], command="mosa bench --cases A")
    assert "| A | 4+505 vs 9 | 16 | 64 x 1024 | 2.000 ms, 100 MiB | not run | 3.000 ms, 150 MiB (1.50x, 1.50x mem) |" \
        in report
    assert "`mosa bench --cases A`" in report and "100,000" in report


def test_training_steps_alone():
    """`--cases` with no case and `--train-models 4+17`: the report has no layer table, and dense is timed first."""
    import argparse

    from torch_mosa.bench.command import add_arguments, train_model_names

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--cases", "--train-step", "--train-models", "4+17"])
    assert args.cases == [] and train_model_names(args.train_models) == ["dense", "MoSA 4 + 17, sparsity 32"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--train-models", "s32"])
    report = markdown_report([], train_rows=[("dense", 64, 2e5, 1.0), ("MoSA 4 + 17, sparsity 32", 64, 1e5, 1.0)])
    assert "| case |" not in report and "| MoSA 4 + 17, sparsity 32 | 64 | 100,000 | 0.50x | 1 |" in report


@pytest.mark.parametrize("compile_layers,cuda_graphs", [(False, False), (True, False), (False, True)])
def test_layer_paths_and_compilation(monkeypatch, compile_layers, cuda_graphs):
    """Each path times the right layer with the fast path switched as named; with compile_layers every path's layer
    is compiled afresh (dynamo reset first: the switch is read once while tracing); cuda_graphs reaches the timer."""
    from torch_mosa.bench import cases
    from torch_mosa.layers.dense import DenseAttention
    from torch_mosa.layers.hybrid import HybridAttention
    from torch_mosa.ops.dispatch import fast_path_enabled

    timed, resets = [], []
    monkeypatch.setattr(cases, "time_layer", lambda layer, x, grad_y, cuda_graph: timed.append(
        (layer, fast_path_enabled(), cuda_graph)) or (1.0, 2.0))
    monkeypatch.setattr(torch, "compile", lambda module: ("compiled", module))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    case = cases.Case("tiny", 32, 3, 1, 4, 16, 2, True, 2)
    result = cases.run_case(case, ("dense", "reference", "fast"), compile_layers=compile_layers, device="cpu",
                            cuda_graphs=cuda_graphs)
    assert result == {"dense": (1.0, 2.0), "reference": (1.0, 2.0), "fast": (1.0, 2.0)}
    layers = [layer[1] if compile_layers else layer for layer, _, _ in timed]
    assert [type(m) for m in layers] == [DenseAttention, HybridAttention, HybridAttention]
    assert [fast for _, fast, _ in timed] == [False, False, True]
    assert [graphed for _, _, graphed in timed] == [cuda_graphs] * 3
    assert [isinstance(layer, tuple) and layer[0] == "compiled" for layer, _, _ in timed] == [compile_layers] * 3
    assert len(resets) == (3 if compile_layers else 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_needs_cuda(capsys):
    from torch_mosa.cli import main

    assert main(["bench", "--cases", "A"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_packed_document_ids_for_the_training_step():
    from torch_mosa.bench.cases import packed_document_ids
    from torch_mosa.ops.documents import document_layout

    ids = packed_document_ids(5, 64, 7)
    layout = document_layout(ids)  # contiguous, non-decreasing
    assert (layout.document_count() == 7).all() and (layout.lengths >= 1).all()
    assert torch.equal(ids, packed_document_ids(5, 64, 7))  # a fixed seed


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_layer_step_matches_eager(dtype):
    """`graph_step` over a hybrid layer's forward + backward on the fast path: the capture succeeds (no host
    synchronisation in the step), and each replay recomputes the gradients of whatever the input holds, equal to an
    eager step's up to the fp32 atomics' summation order."""
    from torch_mosa.bench.cases import graph_step
    from torch_mosa.layers.hybrid import HybridAttention
    from torch_mosa.ops.dispatch import fast_path

    torch.manual_seed(0)
    layer = HybridAttention(96, 32, num_mosa_heads=13, num_dense_heads=2, k=16, include_first=True).cuda().to(dtype)
    x = torch.randn(3, 200, 96, device="cuda", dtype=dtype, requires_grad=True)
    grad_y = torch.randn_like(x)
    leaves = [x, *layer.parameters()]

    def step():
        layer(x).backward(grad_y)

    with fast_path(True):
        replay = graph_step(step, leaves)
        graphed = [t.grad for t in leaves]  # the graph's own buffers, rewritten by every replay
        for _ in range(2):  # a new input each time: the replay must follow it
            with torch.no_grad():
                x.copy_(torch.randn_like(x))
            replay()
            expected = torch.autograd.grad(layer(x), leaves, grad_y)  # eager, leaves' .grad untouched
            for got, want in zip(graphed, expected):
                bound = 1e-5 if dtype == torch.float32 else 2e-2
                error = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
                assert error < bound, error


@pytest.mark.cuda
def test_graphed_training_step_runs():
    """A whole MoSA training step (eager model, bf16 autocast, fused capturable AdamW) captures as a CUDA graph and
    its replays train: `mosa bench --train-step --cuda-graph-steps` times exactly this."""
    from torch_mosa.bench.cases import train_step_tokens_per_second

    tokens_per_s, mib = train_step_tokens_per_second(dict(attention="mosa", sparsity=64), batch=2, steps=2,
                                                     compile_model=False, cuda_graph=True)
    assert tokens_per_s > 0 and mib > 0
