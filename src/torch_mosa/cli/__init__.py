"""`mosa` command line: one module per subcommand, each with `add_parser(subparsers)` and `run(args)`.

A package rather than one cli.py so that each command's arguments sit in a short file of their own; the modules only
parse, call the library and print. `main` turns every failure into one line on stderr: exit 2 for a problem with
the input or the machine (bad argument, missing or corrupt file, full disk, no CUDA), 1 for an internal error
(its traceback with `--debug`), 128 + N after signal N (a training run stopped by Ctrl-C keeps a checkpoint).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

COMMANDS = ("prepare", "train", "eval", "calibrate", "generate", "compare", "plot", "flops", "bench", "export_hf",
            "inspect", "leak")


def build_parser() -> argparse.ArgumentParser:
    from torch_mosa import __version__

    parser = argparse.ArgumentParser(prog="mosa", description="Mixture of Sparse Attention: train, evaluate, benchmark.")
    parser.add_argument("--version", action="version", version=f"torch-mosa {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"torch_mosa.cli.{name}").add_parser(subparsers)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Failures caused by the input or the machine, reported as one line with exit code 2."""
    from safetensors import SafetensorError

    return ValueError, TypeError, OSError, SafetensorError, ImportError


def main(argv: list[str] | None = None) -> int:
    from torch_mosa.train.trainer import TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except TrainingInterrupted as stopped:
        print(f"mosa {args.command}: {stopped}", file=sys.stderr)
        return 128 + stopped.signal_number
    except KeyboardInterrupt:
        print(f"mosa {args.command}: interrupted", file=sys.stderr)
        return 130
    except user_errors() as error:
        if args.debug:
            traceback.print_exc()
        print(f"mosa {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the last line of defence: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (rerun with `mosa --debug ...` for the traceback)"
        print(f"mosa {args.command}: internal error: {type(error).__name__}: {error}{hint}", file=sys.stderr)
        return 1
