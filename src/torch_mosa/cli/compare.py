"""`mosa compare`: train the IsoFLOP family (dense baseline = sparsity 1) on the same tokens and write a markdown
table and a perplexity-vs-sparsity plot, like the paper's Figure 3."""

from __future__ import annotations

from pathlib import Path

from torch_mosa.cli.train import (DEFAULT_BATCH_SIZE, MODEL_OPTIONS, TRAIN_OPTIONS, add_model_arguments,
                                  add_train_arguments, given)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compare", help="train dense vs sparse IsoFLOP models and tabulate/plot perplexity",
                              description=__doc__)
    p.add_argument("--preset", default="micro", help="micro, tiny, small, medium, large (default micro)")
    p.add_argument("--sparsity", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="sparsities; 1 is the dense baseline (default 1 4 16 64)")
    p.add_argument("--attention", nargs="+", default=["dense", "mosa"],
                   help="attention kinds: dense mosa pure_mosa fixed routing local (default dense mosa)")
    p.add_argument("--data", default=None, help="as for `mosa train` (default: the synthetic recall task)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens per model")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    add_model_arguments(p)
    add_train_arguments(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    p.set_defaults(run=run)


def run(args) -> int:
    from torch_mosa.train import TrainConfig
    from torch_mosa.train.compare import run_comparison

    train_config = TrainConfig(**{"batch_size": DEFAULT_BATCH_SIZE,
                                  **given(args, TRAIN_OPTIONS + ("data", "progress"))})
    results = run_comparison(args.preset, args.attention, args.sparsity, args.tokens, args.out, train_config,
                             given(args, MODEL_OPTIONS))
    out = Path(args.out)
    print((out / "comparison.md").read_text().rstrip())
    print(f"\nwrote {out / 'comparison.md'}, {out / 'comparison.json'} and {out / 'ppl_vs_sparsity.png'} "
          f"({len(results)} runs)")
    return 0
