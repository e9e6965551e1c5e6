"""GPU cost of router health (issue 13 part 2): a Tiny training step timed plainly and as a logging step
(MoSA layers record their selection, then `model_router_health` reduces it, one host read).

`PYTHONPATH=src python benchmarks/router_health_overhead.py [--batch 64] [--steps 20] [--no-compile]` prints, for
each Tiny model, the median step in ms with and without the statistics, the extra ms of a logging step, and that
extra amortised over the trainer's default log interval (10 steps). bf16 autocast, fused AdamW, random tokens;
the two kinds of step alternate so that clock drift hits both alike.
"""

import argparse
import statistics

import torch

from torch_mosa import MoSAConfig
from torch_mosa.inference.router_health import model_router_health, record_selections
from torch_mosa.models.lm import MoSALM

MODELS = {
    "Tiny MoSA sparsity 64 (4 dense + 505 MoSA heads)": dict(attention="mosa", sparsity=64),
    "Tiny MoSA sparsity 16 (4 dense + 142 MoSA heads)": dict(attention="mosa", sparsity=16),
    "Tiny MoSA sparsity 8 (4 dense + 69 MoSA heads)": dict(attention="mosa", sparsity=8),
}
LOG_INTERVAL = 10  # TrainConfig.log_interval's default


def time_steps(model_kwargs: dict, batch: int, steps: int, compile_model: bool) -> tuple[list[float], list[float]]:
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = MoSAConfig.from_preset("tiny", **model_kwargs)
    model = MoSALM(config).to(device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-4, fused=True)
    forward = torch.compile(model) if compile_model else model
    tokens = torch.randint(0, config.vocab_size, (batch, config.max_seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step(with_health: bool) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        record_selections(model, with_health)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # the trainer reads the loss every step, so both kinds of step sync once
        if with_health:
            averaged, _ = model_router_health(model)
            assert averaged, "no router health was recorded"
        end.record()
        torch.cuda.synchronize()
        assert loss_value == loss_value
        return start.elapsed_time(end)

    for _ in range(3):  # warm up both variants (under compile, the recording flag is a guard: two graphs)
        step(False)
        step(True)
    plain, logged = [], []
    for _ in range(steps):
        plain.append(step(False))
        logged.append(step(True))
    del model, optimizer, forward
    torch.cuda.empty_cache()
    return plain, logged


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, batch {args.batch} x 1024 tokens, bf16, "
          f"{'compiled' if args.compile else 'eager'}, median of {args.steps} steps each")
    print("| model | plain step ms | logging step ms | extra ms | extra % per logging step | "
          f"extra % amortised over {LOG_INTERVAL} steps |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, kwargs in MODELS.items():
        plain, logged = time_steps(kwargs, args.batch, args.steps, args.compile)
        plain_ms, logged_ms = statistics.median(plain), statistics.median(logged)
        extra = logged_ms - plain_ms
        print(f"| {name} | {plain_ms:.2f} | {logged_ms:.2f} | {extra:.2f} | {100 * extra / plain_ms:.2f} | "
              f"{100 * extra / plain_ms / LOG_INTERVAL:.3f} |", flush=True)


if __name__ == "__main__":
    main()
