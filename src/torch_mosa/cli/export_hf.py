"""`mosa export-hf RUN --out DIR`: a trained run (its latest checkpoint with the calibrated causal thresholds, and its
tokenizer) as a Hugging Face model folder for `AutoModelForCausalLM`, `generate()` and `pipeline()` (needs the hf
extra: pip install "torch-mosa[hf]")."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export-hf", help="export a run as a Hugging Face model folder", description=__doc__)
    p.add_argument("checkpoint", metavar="RUN", help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.set_defaults(run=run)


def import_hf():
    """torch_mosa.hf, or a ValueError the CLI prints when transformers is not installed."""
    try:
        import torch_mosa.hf
    except ImportError as error:
        raise ValueError(str(error)) from None
    return torch_mosa.hf


def is_model_folder(path) -> bool:
    """True for a Hugging Face model folder of a MoSA model (config.json with model_type "mosa")."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "mosa"
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def run(args) -> int:
    from torch_mosa.inference.calibrate import uncalibrated

    out, model, tokenizer = import_hf().export_run(args.checkpoint, args.out)
    print(f"wrote {out}: {model.num_parameters():,} parameters, {model.config.attention} attention, "
          f"{tokenizer.kind} tokenizer ({tokenizer.vocab_size} tokens)")
    if tokenizer.kind != "bpe":
        print(f"note: a {tokenizer.kind} tokenizer has no transformers equivalent: AutoTokenizer and pipeline() need a "
              "run trained with the BPE tokenizer; `mosa generate` reads this folder", file=sys.stderr)
    if uncalibrated(model):
        print(f"warning: {args.checkpoint} has uncalibrated causal-routing thresholds; run `mosa calibrate` and "
              "export again for the cache sizes and quality of top-k routing", file=sys.stderr)
    return 0
