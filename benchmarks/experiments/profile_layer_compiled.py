"""Where a compiled layer's forward + backward spends its GPU time, kernel by kernel, MoSA beside dense (issue 10).

`mosa bench --cases A B --paths dense fast --compile-layers` times the SPEC §6 layers; this profiles the same
compiled steps and prints, per case and path, the GPU time per kernel (ms per step, summed over its launches), per
group of kernels (profile_train_step.py's groups: the MoSA op's own kernels, GEMMs, attention, selection, Inductor's
fused kernels) and the total, so the gap to dense can be read kernel by kernel.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/profile_layer_compiled.py --cases A B`.
"""

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from profile_train_step import group_of, kernel_times
from torch_mosa.bench.cases import CASES, _layers, case_inputs
from torch_mosa.ops.dispatch import fast_path


def kernel_table(layer, x, grad_y, steps: int = 5) -> tuple[float, dict]:
    """(wall ms per step, {kernel name: (launches per step, ms per step)}) of `steps` forward + backward."""
    for _ in range(3):
        layer(x).backward(grad_y)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            layer(x).backward(grad_y)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / steps, kernel_times(prof, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["A", "B"], choices=["A", "B", "C"])
    parser.add_argument("--top", type=int, default=22)
    args = parser.parse_args()
    device = torch.device("cuda")
    for name in args.cases:
        case = CASES[name][0]
        torch.manual_seed(0)
        mosa, dense = _layers(case, device)
        x, grad_y = case_inputs(case, device)
        for path, layer in (("dense", dense), ("fast", mosa)):
            with fast_path(path == "fast"):
                torch._dynamo.reset()
                wall, table = kernel_table(torch.compile(layer), x, grad_y)
            total = sum(ms for _, ms in table.values())
            print(f"\n## case {name}, {path}: wall {wall:.3f} ms/step (profiled), kernels {total:.3f} ms/step, "
                  f"{sum(c for c, _ in table.values()):.0f} launches")
            groups = collections.defaultdict(float)
            for kernel, (_, ms) in table.items():
                groups[group_of(kernel)] += ms
            print("groups (ms/step): " + ", ".join(f"{g} {ms:.3f}" for g, ms in sorted(groups.items(),
                                                                                      key=lambda item: -item[1])))
            print("| kernel | launches | ms/step |\n|---|---|---|")
            for kernel, (count, ms) in sorted(table.items(), key=lambda item: -item[1][1])[:args.top]:
                print(f"| {kernel[:90]} | {count:.0f} | {ms:.3f} |")
            x.grad = None
            for p in layer.parameters():
                p.grad = None
        del mosa, dense, x, grad_y
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
