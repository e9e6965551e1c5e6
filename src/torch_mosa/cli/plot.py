"""`mosa plot`: PNG loss curves (training loss, validation points) of one or more runs against tokens seen."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="plot the loss curves of training runs", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.csv)")
    p.add_argument("--out", default="loss_curves.png", help="PNG file to write (default loss_curves.png)")
    p.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run (default: directory names)")
    p.set_defaults(run=run)


def run(args) -> int:
    from torch_mosa.train.plots import plot_loss_curves

    if args.labels is not None and len(args.labels) != len(args.runs):
        raise ValueError(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    print(f"wrote {plot_loss_curves(args.runs, args.out, args.labels)}")
    return 0
