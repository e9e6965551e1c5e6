"""The kernels of one compiled decode step, per model, beside the yardstick's (issue 11).

`mosa bench --decode --compile-decode` replays each step as a CUDA graph after Inductor compiled it; at the Tiny
shape a step is a few hundred microseconds of small kernels, so the launches a model adds (not the work) decide its
speed. This profiles the same compiled step WITHOUT the graph (the graph replays the same kernels) for the
yardstick, torch-mosa dense, the 4 + 17 and the IsoFLOP model at B=1 and B=32, and writes per model:
kernels per step, GPU kernel time per step, and each kernel's calls per step and mean time.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/profile_decode_compiled.py --out DIR`.
"""

import argparse
import collections
import pathlib

import torch
from torch.profiler import ProfilerActivity, profile

from torch_mosa.bench.decode import Yardstick, build_model
from torch_mosa.inference.decode import decode_one_token, new_cache, prefill
from torch_mosa.inference.graphs import compiled_decode
from torch_mosa.inference.limits import set_causal_limits, suggested_causal_limits

PROMPT, MAX_LEN, STEPS = 256, 256 + 136, 20


def step_function(name, model, batch):
    """-> (step(tokens, position) -> logits, first token) after a prefill of a random prompt."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda")
    if name == "yardstick":
        runner = Yardstick(model, batch, MAX_LEN)
        return compiled_decode(runner.decode), runner.prefill(prompt)[:, -1:].argmax(-1)
    if model.mosa_layers:
        set_causal_limits(model, **suggested_causal_limits(model, MAX_LEN))
    cache = new_cache(model, batch, MAX_LEN, torch.bfloat16, "cuda")
    step = compiled_decode(decode_one_token)
    first = prefill(model, prompt, None, cache)[:, -1:].argmax(-1)
    return (lambda tokens, position: step(model, tokens, position, cache)), first


def kernels_per_step(step, token, steps=STEPS):
    position = torch.tensor([PROMPT], device="cuda")
    for _ in range(3):  # compile and warm up
        step(token, position)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(token, position)
            position.add_(1)
        torch.cuda.synchronize()
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_name[event.name]
            entry[0] += 1
            entry[1] += event.device_time
    return {name: (count / steps, total / count) for name, (count, total) in per_name.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--models", nargs="+", default=["yardstick", "dense", "mosa 4+17 s32", "mosa IsoFLOP s64"])
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = ["| model | B | kernels/step | GPU kernel us/step |", "|---|---|---|---|"]
    with open(out / "profile-decode-compiled.txt", "w") as f, torch.no_grad():
        for batch in args.batches:
            for name in args.models:
                torch._dynamo.reset()
                model = build_model("dense" if name == "yardstick" else name, "tiny", "cuda", torch.bfloat16)
                step, token = step_function(name, model, batch)
                table = kernels_per_step(step, token)
                launches = sum(calls for calls, _ in table.values())
                total = sum(calls * us for calls, us in table.values())
                summary.append(f"| {name} | {batch} | {launches:.1f} | {total:.1f} |")
                f.write(f"== {name} B={batch}: {launches:.1f} kernels, {total:.1f} us of kernels per step\n")
                for kernel, (calls, us) in sorted(table.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
                    f.write(f"  {calls:6.1f} x {us:8.2f} us  {kernel[:110]}\n")
                f.flush()
                del model, step
                torch.cuda.empty_cache()
    (out / "profile-decode-compiled-summary.md").write_text("\n".join(summary) + "\n")
    print((out / "profile-decode-compiled.txt").read_text()[-6000:])
    print("\n".join(summary))


if __name__ == "__main__":
    main()
