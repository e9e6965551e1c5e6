"""`mosa bench`: SPEC §6 cases A-D for dense SDPA, the MoSA reference path and the fast path; writes markdown."""

from __future__ import annotations

from torch_mosa.bench.command import add_arguments, run


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time MoSA layers (dense / reference / fast path) on a CUDA GPU")
    add_arguments(p)
    p.set_defaults(run=run)
