"""Compiled SPEC §6 layers with the kernels' untimed settings changed, beside dense and the defaults in one run: the
step from an op-level win (`op_kernels_ncu.py --variants`, `select_by_sort.py`) to the layer table `mosa bench`
prints.

Each variant is a comma-separated list of assignments to module settings, NAME=VALUE or NAME.KEY=VALUE for a dict
setting, in ops/mosa/triton_mosa.py unless prefixed `selection:` (ops/selection/triton_selection.py); values are
integers, True or False. Every step (a layer's forward + backward) is compiled and replayed as a CUDA graph, as
`mosa bench --compile-layers --cuda-graph-steps` times it; MoSA with the defaults runs first and last.

On the GPU machine:
`PYTHONPATH=src python benchmarks/experiments/layer_variants.py --cases A B C --variant TILE_GROUP.dx=1
--variant WEIGHTS_SPLIT=True,SPLIT_OUTPUT_KERNEL=True --variant selection:SELECT_BY_SORT=True`
"""

import argparse
import contextlib

import torch

from torch_mosa.bench.cases import CASES, _layers, case_inputs, time_layer
from torch_mosa.ops.dispatch import fast_path
from torch_mosa.ops.mosa import triton_mosa
from torch_mosa.ops.selection import triton_selection

MODULES = {"": triton_mosa, "selection": triton_selection}


def parse_variant(text: str) -> list:
    """'A.b=1,C=True' -> [(module, 'A', 'b', 1), (module, 'C', None, True)], each checked against the module."""
    changes = []
    for assignment in text.split(","):
        target, _, value = assignment.partition("=")
        prefix, _, name = target.rpartition(":")
        if prefix not in MODULES:
            raise ValueError(f"variant {text!r}: module prefix must be one of {sorted(MODULES)}, got {prefix!r}")
        module = MODULES[prefix]
        name, _, key = name.partition(".")
        if not hasattr(module, name):
            raise ValueError(f"variant {text!r}: {module.__name__} has no setting {name!r}")
        if key and key not in getattr(module, name):
            raise ValueError(f"variant {text!r}: {name} has no key {key!r} (keys: {sorted(getattr(module, name))})")
        parsed = {"True": True, "False": False}.get(value)
        changes.append((module, name, key or None, int(value) if parsed is None else parsed))
    return changes


@contextlib.contextmanager
def applied(changes):
    """The module settings of `changes` for the duration of the block, restored after."""
    saved = [(module, name, getattr(module, name)) for module, name, _, _ in changes]
    try:
        for module, name, key, value in changes:
            setattr(module, name, {**getattr(module, name), key: value} if key else value)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["A", "B", "C"], choices=["A", "B", "C"])
    parser.add_argument("--variant", action="append", default=[], help="NAME[.KEY]=VALUE,... (repeatable)")
    args = parser.parse_args()
    variants = [("defaults", [])] + [(text, parse_variant(text)) for text in args.variant] + [("defaults", [])]
    print("| case | setting | ms | vs dense | peak MiB |\n|---|---|---|---|---|")
    for name in args.cases:
        case = CASES[name][0]
        torch.manual_seed(0)
        mosa, dense = _layers(case, torch.device("cuda"))
        x, grad_y = case_inputs(case, "cuda")
        with fast_path(False):
            torch._dynamo.reset()
            dense_ms, dense_peak = time_layer(torch.compile(dense), x, grad_y, cuda_graph=True)
        print(f"| {name} | dense | {dense_ms:.3f} | 1.00x | {dense_peak:.0f} |", flush=True)
        for label, changes in variants:
            with fast_path(True), applied(changes):
                torch._dynamo.reset()
                ms, peak = time_layer(torch.compile(mosa), x, grad_y, cuda_graph=True)
            print(f"| {name} | {label} | {ms:.3f} | {ms / dense_ms:.2f}x | {peak:.0f} |", flush=True)
        del mosa, dense, x, grad_y
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
