"""`python -m torch_mosa.bench --cases A B C D --out benchmarks/results.md` (also `mosa bench`)."""

import argparse
import sys

from torch_mosa.bench.command import add_arguments, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_mosa.bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv)) or 0


sys.exit(main())
