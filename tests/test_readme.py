"""The README's command tour runs as written, at micro scale: each command gets small-scale options appended
(argparse keeps the last value), everything else is the README's own text."""

import re
import shlex
from pathlib import Path

from torch_mosa import cli

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = ["--num-layers", "1", "--hidden-size", "32", "--ffn-size", "64", "--head-dim", "8", "--max-seq-len", "32",
         "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--no-progress"]
MICRO_SCALE = {
    "train": ["--steps", "2", *MODEL],
    "compare": ["--tokens", "256", *MODEL],
    "eval": ["--seq-len", "32", "--max-batches", "1", "--calibrate-batches", "1", "--decode-tokens", "4"],
    "calibrate": ["--batches", "1", "--seq-len", "32"],
    "generate": ["--max-new-tokens", "4"],
    "leak": ["--seq-len", "32", "--windows", "4", "--calibrate-batches", "1"],
}


def tour() -> list[list[str]]:
    block = re.search(r"## Command line\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_command_tour_runs(tmp_path, monkeypatch, shared_data):
    (tmp_path / "shared").symlink_to(shared_data.parent)
    (tmp_path / "clone").mkdir()
    monkeypatch.chdir(tmp_path / "clone")
    commands = tour()
    assert [argv[1] for argv in commands][:3] == ["flops", "train", "prepare"]
    for argv in commands:
        assert argv[0] == "mosa"
        if argv[1] == "bench":  # a CUDA GPU only
            continue
        assert cli.main([*argv[1:], *MICRO_SCALE.get(argv[1], [])]) == 0, argv
    assert Path("curves.png").is_file() and Path("runs/compare/comparison.md").is_file()
