"""Where the time goes in two places the issues' targets are missed, by torch.profiler's CUDA kernel table:

  case D    one MoSA layer (60 heads, k 64, h 1024) at B=1, T=131072, forward+backward: its time is nearly flat in T
            (benchmarks/mosa_layer.md), so it is not the kernels' work; this shows which launches it is
  decode    one eager decode step of the Tiny 4 + 17 (sparsity 32) and IsoFLOP (4 + 505, sparsity 64) models at B=1
            and B=32, after a 256-token prompt: the time of each kernel of the step (the graphed step replays the
            same kernels without the launch gaps)

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/profile_case_d_and_decode.py [--out DIR]`.
"""

import argparse
import pathlib

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_table(run, steps: int, title: str, out: pathlib.Path | None, rows: int = 18) -> None:
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    total = sum(e.device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    text = f"== {title}: {steps} steps, {total / steps / 1e3:.3f} ms of GPU kernels per step\n{table}\n"
    print(text, flush=True)
    if out is not None:
        with open(out / "profile.txt", "a") as f:
            f.write(text)


def profile_case_d(out) -> None:
    from torch_mosa.bench.cases import CASES, _layers, case_inputs

    case = CASES["D"][-1]
    layer, _ = _layers(case, "cuda")
    x, grad = case_inputs(case, "cuda")
    kernel_table(lambda: layer(x).backward(grad), 5, f"case D T={case.seq_len} forward+backward", out)


def profile_decode(name: str, batch: int, out) -> None:
    from torch_mosa.bench.decode import build_model
    from torch_mosa.inference.decode import decode_one_token, new_cache, prefill
    from torch_mosa.inference.limits import set_causal_limits, suggested_causal_limits

    model = build_model(name, "tiny", "cuda", torch.bfloat16)
    set_causal_limits(model, **suggested_causal_limits(model, 256 + 64))  # as the decode benchmark sizes them
    with torch.no_grad():
        cache = new_cache(model, batch, 256 + 64, torch.bfloat16, "cuda")
        prompt = torch.randint(0, model.config.vocab_size, (batch, 256), device="cuda")
        token = prefill(model, prompt, None, cache)[:, -1:].argmax(-1)
        position = torch.tensor([256], device="cuda")

        def step():
            decode_one_token(model, token, position, cache)
            position.add_(1)

        kernel_table(step, 20, f"decode step {name} B={batch} (eager)", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = pathlib.Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    profile_case_d(out)
    torch.cuda.empty_cache()
    for name in ("mosa 4+17 s32", "mosa IsoFLOP s64"):
        for batch in (1, 32):
            profile_decode(name, batch, out)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
