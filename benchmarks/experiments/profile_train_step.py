"""Where a compiled whole-model training step spends its GPU time, per model of `bench.TRAIN_MODELS` (issue 10).

`mosa bench --train-step` times the Tiny models' training step (B=64 x 1024, torch.compile, bf16 autocast, fused
AdamW); the MoSA models run at 0.60-0.95x dense there. This profiles the same step and writes, per model: wall time
per step, GPU kernel time per step (the sum of kernel durations; concurrent kernels would count twice, but the step
runs on one stream), kernels per step, the time per kernel group (MoSA op kernels, GEMMs, attention, Inductor's
fused kernels, selection: topk/sort/scatter, optimizer) and the largest kernels.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/profile_train_step.py --out DIR [--documents 4]`.
"""

import argparse
import collections
import pathlib
import re

import torch
from torch.profiler import ProfilerActivity, profile

from torch_mosa.bench.cases import TRAIN_MODELS, training_step

# (group, pattern on the kernel name), first match wins
GROUPS = (
    ("mosa op", r"^_(mosa|topk_route|topk_segments|combine|segment)"),  # the op's own Triton kernels
    ("attention (sdpa/flash)", r"flash|fmha|attention|sdpa|cudnn"),
    ("gemm", r"gemm|xmma|cutlass|nvjet|sm90_|ampere_|cublas|splitK"),
    ("selection (topk/sort/scatter/index)", r"topk|sort|radix|scatter|gather|index|bitonic|unique|cumsum|scan"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("inductor fused", r"^triton_"),
)


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return group
    return "other"


def kernel_times(prof, steps: int) -> dict:
    """{kernel name: (launches per step, ms per step)} of a torch.profiler run over `steps` steps."""
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        # "Optimizer.step#AdamW.step" is the optimizer's annotation range on the GPU timeline, not a kernel: it
        # would count the optimizer's kernels twice
        if event.device_type == torch.autograd.DeviceType.CUDA and "#" not in event.name:
            entry = per_name[event.name]
            entry[0] += 1
            entry[1] += event.device_time  # us
    return {name: (count / steps, total / steps / 1e3) for name, (count, total) in per_name.items()}


def profile_model(model_kwargs: dict, batch: int, documents: int, steps: int = 3):
    step, _ = training_step(model_kwargs, batch, documents=documents)  # the step `mosa bench --train-step` times
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / steps
    table = kernel_times(prof, steps)
    del step
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return wall_ms, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--documents", type=int, default=0, help="pack this many documents per row (0: plain rows)")
    parser.add_argument("--models", nargs="+", default=list(TRAIN_MODELS), choices=list(TRAIN_MODELS))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-packed{args.documents}" if args.documents else ""
    group_names = [g for g, _ in GROUPS] + ["other"]
    summary = ["| model | wall ms/step | GPU kernel ms/step | kernels/step | " + " | ".join(group_names) + " |",
               "|---" * (4 + len(group_names)) + "|"]
    with open(out / f"profile-train-step{suffix}.txt", "w") as f:
        for name in args.models:
            wall_ms, table = profile_model(TRAIN_MODELS[name], args.batch, args.documents)
            kernel_ms = sum(ms for _, ms in table.values())
            launches = sum(calls for calls, _ in table.values())
            groups = collections.Counter()
            for kernel, (_, ms) in table.items():
                groups[group_of(kernel)] += ms
            summary.append(f"| {name} | {wall_ms:.2f} | {kernel_ms:.2f} | {launches:.0f} | "
                           + " | ".join(f"{groups[g]:.2f}" for g in group_names) + " |")
            f.write(f"== {name}: {wall_ms:.2f} ms wall, {kernel_ms:.2f} ms of kernels, {launches:.0f} kernels "
                    f"per step\n")
            for kernel, (calls, ms) in sorted(table.items(), key=lambda kv: -kv[1][1])[:40]:
                f.write(f"  {calls:6.1f} x {1e3 * ms / calls:9.1f} us = {ms:7.3f} ms  [{group_of(kernel)}]  "
                        f"{kernel[:120]}\n")
            f.flush()
            print(summary[-1], flush=True)
    text = "\n".join(summary) + "\n"
    (out / f"profile-train-step{suffix}-summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
