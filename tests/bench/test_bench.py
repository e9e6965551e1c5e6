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


@pytest.mark.parametrize("compile_layers", [False, True])
def test_layer_paths_and_compilation(monkeypatch, compile_layers):
    """Each path times the right layer with the fast path switched as named; with compile_layers every path's layer
    is compiled afresh (dynamo reset first: the switch is read once while tracing)."""
    from torch_mosa.bench import cases
    from torch_mosa.layers.dense import DenseAttention
    from torch_mosa.layers.hybrid import HybridAttention
    from torch_mosa.ops.dispatch import fast_path_enabled

    timed, resets = [], []
    monkeypatch.setattr(cases, "time_layer",
                        lambda layer, x, grad_y: timed.append((layer, fast_path_enabled())) or (1.0, 2.0))
    monkeypatch.setattr(torch, "compile", lambda module: ("compiled", module))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    case = cases.Case("tiny", 32, 3, 1, 4, 16, 2, True, 2)
    result = cases.run_case(case, ("dense", "reference", "fast"), compile_layers=compile_layers, device="cpu")
    assert result == {"dense": (1.0, 2.0), "reference": (1.0, 2.0), "fast": (1.0, 2.0)}
    layers = [layer[1] if compile_layers else layer for layer, _ in timed]
    assert [type(m) for m in layers] == [DenseAttention, HybridAttention, HybridAttention]
    assert [fast for _, fast in timed] == [False, False, True]
    assert [isinstance(layer, tuple) and layer[0] == "compiled" for layer, _ in timed] == [compile_layers] * 3
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
