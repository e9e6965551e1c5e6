"""`mosa` command line: one module per subcommand, each with `add_parser(subparsers)` and `run(args)`.

A package rather than one cli.py so that each command's arguments sit in a short file of their own; the modules only
parse, call the library and print.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("prepare", "train", "eval", "calibrate", "generate", "compare", "plot", "flops", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosa", description="Mixture of Sparse Attention: train, evaluate, benchmark.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"torch_mosa.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"mosa {args.command}: error: {error}", file=sys.stderr)
        return 2
