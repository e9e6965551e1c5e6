"""Where the host's time goes in one MoSA layer's forward + backward (SPEC §6 cases C and A).

forward_tiles_layer.py found the host taking 4.5-5.0 ms to issue a forward + backward, about case C's GPU time,
though the step launches only a few Triton kernels and custom ops. This lists, per case: the wall time of a
synchronised step, the GPU kernel time per step, and the operators and calls of largest self CPU time
(torch.profiler, CPU and CUDA activity), so the next change can aim at the host work that is really there.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/profile_layer_host.py [--out DIR]`.
"""

import argparse
import pathlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

from torch_mosa.bench.cases import CASES, _layers, case_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--cases", nargs="+", default=["C", "A"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    with open(out / "profile-layer-host.txt", "w") as f:
        for name in args.cases:
            case = CASES[name][0]
            mosa, _ = _layers(case, "cuda")
            x, grad_y = case_inputs(case, "cuda")

            def step():
                mosa(x).backward(grad_y)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
                torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / args.steps * 1e3
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
            events = prof.key_averages()
            gpu = sum(e.self_device_time_total for e in events) / args.steps / 1e3
            cpu = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
            table = events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
            text = (f"== case {name}: synchronised step {wall:.3f} ms, GPU kernels {gpu:.3f} ms per step, self CPU "
                    f"time of all operators {cpu:.3f} ms per step\n{table}\n")
            f.write(text)
            print(text, flush=True)
            summary.append(f"| {name} | {wall:.3f} | {gpu:.3f} | {cpu:.3f} |")
            torch.cuda.empty_cache()
    print("| case | synchronised step ms | GPU kernel ms | self CPU ms (profiled) |\n|---|---|---|---|")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
