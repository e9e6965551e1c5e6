"""`mosa compare`: train the IsoFLOP family (dense baseline = sparsity 1) on the same tokens, each model at every
learning rate of a sweep, and write a markdown table (each family at its best rate), a JSON of every run, a
perplexity-vs-sparsity plot like the paper's Figure 3 and a loss-vs-rate plot."""

from __future__ import annotations

from pathlib import Path

from torch_mosa.cli.train import (DATA_DEFAULTS, DEFAULT_BATCH_SIZE, MODEL_OPTIONS, PAPER_RECIPE, SYNTHETIC_DEFAULTS,
                                  TRAIN_OPTIONS, add_model_arguments, add_paper_recipe_argument, add_train_arguments,
                                  given)

# Without --lr every family is trained at half, once and twice the single-run default rate of its data.
SWEEP_FACTORS = (0.5, 1.0, 2.0)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compare", help="train dense vs sparse IsoFLOP models, each at its best learning rate, "
                                              "and tabulate/plot perplexity", description=__doc__)
    p.add_argument("--preset", default="micro", help="micro, tiny, small, medium, large (default micro)")
    p.add_argument("--sparsity", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="sparsities; 1 is the dense baseline (default 1 4 16 64)")
    p.add_argument("--attention", nargs="+", default=["dense", "mosa"],
                   help="attention kinds: dense mosa pure_mosa fixed routing local (default dense mosa)")
    p.add_argument("--data", default=None, help="as for `mosa train` (default: the synthetic recall task)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens per model")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    add_model_arguments(p)
    add_train_arguments(p, lr_sweep=True)
    add_paper_recipe_argument(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    p.set_defaults(run=run)


def run(args) -> int:
    from torch_mosa.train import TrainConfig
    from torch_mosa.train.compare import run_comparison

    # The single run's learning rate and warmup for this kind of data; the batch of a run on text.
    schedule = DATA_DEFAULTS if args.data is not None else SYNTHETIC_DEFAULTS
    defaults = {"batch_size": DEFAULT_BATCH_SIZE, "lr": schedule["lr"],
                **({"warmup_steps": schedule["warmup_steps"]} if "warmup_steps" in schedule else {}),
                **(PAPER_RECIPE if args.paper_recipe else {})}
    options = given(args, tuple(name for name in TRAIN_OPTIONS if name != "lr") + ("data", "progress"))
    train_config = TrainConfig(**{**defaults, **options})
    lrs = args.lr
    if lrs is None:
        lrs = [factor * train_config.lr for factor in SWEEP_FACTORS]
        print(f"sweeping learning rates {' '.join(f'{lr:g}' for lr in lrs)} for every model (--lr to choose them)")
    comparison = run_comparison(args.preset, args.attention, args.sparsity, args.tokens, args.out, train_config,
                                given(args, MODEL_OPTIONS), lrs=lrs)
    out = Path(args.out)
    print((out / "comparison.md").read_text().rstrip())
    print(f"\nwrote {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'ppl_vs_sparsity.png'} and "
          f"{out / 'loss_vs_lr.png'} ({len(comparison['runs'])} runs)")
    return 0
