"""`mosa train`: train one model. With no --data it runs offline on the built-in synthetic recall task."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# CPU-sized defaults for `mosa train` (the paper: batch 64, 100k steps); TrainConfig holds the rest.
DEFAULT_PRESET, DEFAULT_ATTENTION, DEFAULT_SPARSITY = "micro", "mosa", 4
DEFAULT_STEPS = 200
DEFAULT_BATCH_SIZE = 16
# With --data: a learning rate and warmup for runs of hundreds to thousands of steps, where the paper's (tuned for
# 100k steps) barely moves the model: measured on Tiny Shakespeare in docs/training.md.
DATA_DEFAULTS = dict(steps=DEFAULT_STEPS, batch_size=DEFAULT_BATCH_SIZE, lr=3e-3, warmup_steps=100)
# --paper-recipe: the paper's optimizer schedule (SPEC §4), for long runs.
PAPER_RECIPE = dict(lr=2.5e-4, warmup_steps=4000)
# With no --data, the recall task at the size where the micro MoSA model learns it within about a minute on two
# CPU cores (measured in docs/training.md): short sequences, a wide batch and a higher learning rate.
SYNTHETIC_DEFAULTS = dict(steps=400, batch_size=64, seq_len=32, lr=1e-3)
# Model options (MoSAConfig fields) that override the preset.
MODEL_OPTIONS = ("num_layers", "hidden_size", "ffn_size", "head_dim", "num_heads", "num_dense_heads", "num_sparse_heads",
                 "max_seq_len", "router_aux_loss_weight", "fixed_offsets")
# Training options (TrainConfig fields) shared by `mosa train` and `mosa compare`.
TRAIN_OPTIONS = ("tokenizer", "vocab_size", "batch_size", "seq_len", "grad_accum_steps", "lr", "warmup_steps",
                 "weight_decay", "grad_clip", "eval_interval", "eval_batches", "checkpoint_interval",
                 "keep_checkpoints", "log_interval", "seed", "device", "dtype", "compile", "strategy", "routing",
                 "causal_capacity_factor", "threshold_momentum", "pack_documents")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (offline synthetic task when no --data is given)",
                              description=__doc__)
    p.add_argument("--preset", default=None, help=f"micro, tiny, small, medium, large (default {DEFAULT_PRESET})")
    p.add_argument("--attention", default=None,
                   help=f"dense, mosa, pure_mosa, fixed, routing, local (default {DEFAULT_ATTENTION})")
    p.add_argument("--sparsity", type=int, default=None,
                   help=f"sparsity rho of the sparse heads (default {DEFAULT_SPARSITY})")
    p.add_argument("--data", default=None, help="a prepared shard directory, text files/dirs/globs/tar archives, or "
                                                "hf:NAME[:CONFIG[:SPLIT]] (default: the synthetic recall task)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {DEFAULT_STEPS}; {SYNTHETIC_DEFAULTS['steps']} without --data)")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>-<attention>[-s<sparsity>])")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with its saved configuration "
                        "(options given here override it, e.g. a larger --steps)")
    add_model_arguments(p)
    add_train_arguments(p)
    add_paper_recipe_argument(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(run=run)


def add_paper_recipe_argument(p) -> None:
    p.add_argument("--paper-recipe", action="store_true",
                   help=f"the paper's lr {PAPER_RECIPE['lr']:g} and {PAPER_RECIPE['warmup_steps']} warmup steps "
                        "(default with --data: lr {lr:g}, {warmup_steps} warmup steps, for short runs)".format(
                            **DATA_DEFAULTS))


def add_model_arguments(p) -> None:
    group = p.add_argument_group("model overrides (default: the preset's)")
    for name in MODEL_OPTIONS:
        if name == "fixed_offsets":
            group.add_argument("--fixed-offsets", default=None,  # MoSAConfig checks the value
                               help="attention fixed: shared strides (default) or per_head (head e from e mod sparsity)")
            continue
        kind = float if name == "router_aux_loss_weight" else int
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None)


def add_train_arguments(p, lr_sweep: bool = False) -> None:
    group = p.add_argument_group("training (defaults: TrainConfig, SPEC §4)")
    group.add_argument("--tokenizer", choices=("bpe", "byte"), default=None, help="for raw text data (default bpe)")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="BPE vocabulary to train (default 8000) or synthetic vocabulary (default: at least "
                            "32, see docs/training.md)")
    group.add_argument("--batch-size", type=int, default=None,
                       help=f"sequences per optimizer step, over all processes (default {DEFAULT_BATCH_SIZE}; "
                            f"{SYNTHETIC_DEFAULTS['batch_size']} without --data)")
    group.add_argument("--seq-len", type=int, default=None,
                       help=f"tokens per sequence (default: the model's maximum; {SYNTHETIC_DEFAULTS['seq_len']} "
                            "without --data)")
    group.add_argument("--grad-accum-steps", type=int, default=None, help="micro-steps per optimizer step")
    lr_help = (f"peak learning rate (default {DATA_DEFAULTS['lr']:g} with --data, {SYNTHETIC_DEFAULTS['lr']:g} "
               "without)")
    if lr_sweep:
        group.add_argument("--lr", type=float, nargs="+", default=None,
                           help="peak learning rates to train every model at; each family is reported at its best "
                                "(default: half, once and twice the single-run default)")
    else:
        group.add_argument("--lr", type=float, default=None, help=lr_help)
    group.add_argument("--warmup-steps", type=int, default=None,
                       help=f"linear warmup steps, capped at 10%% of the run (default {DATA_DEFAULTS['warmup_steps']} "
                            f"with --data, 4000 without)")
    group.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    group.add_argument("--grad-clip", type=float, default=None, help="gradient norm clip, 0 = none (default 0.25)")
    group.add_argument("--eval-interval", type=int, default=None, help="steps between validations, 0 = end only")
    group.add_argument("--eval-batches", type=int, default=None, help="batches per validation (default 20)")
    group.add_argument("--checkpoint-interval", type=int, default=None, help="steps between checkpoints, 0 = end only")
    group.add_argument("--keep-checkpoints", type=int, default=None, help="checkpoints kept (default 3)")
    group.add_argument("--log-interval", type=int, default=None, help="steps between metrics rows (default 10)")
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    group.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                       help="auto: bfloat16 autocast on CUDA, float32 on CPU")
    group.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    group.add_argument("--strategy", choices=("ddp", "fsdp"), default=None, help="multi-process wrapping (torchrun)")
    group.add_argument("--routing", choices=("topk", "causal"), default=None,
                       help="topk: the paper's expert-choice routing (default); causal: causal training, routing by "
                            "the per-token thresholds that generation uses (docs/causal_inference.md)")
    group.add_argument("--causal-capacity-factor", type=float, default=None,
                       help="causal training: a MoSA head keeps at most factor x k tokens per sequence (default 2)")
    group.add_argument("--threshold-momentum", type=float, default=None,
                       help="causal training: EMA momentum of the thresholds, in [0, 1) (default 0.9)")
    group.add_argument("--pack-documents", action="store_true", default=None,
                       help="keep the corpus's documents apart inside each window: attention and routing never "
                            "cross an end-of-text token, each document routes on its own (docs/training.md)")


def given(args, names) -> dict:
    """The options among `names` that were given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run(args) -> int:
    from torch_mosa.config import MoSAConfig
    from torch_mosa.train import NonFiniteLossError, Trainer, TrainConfig
    from torch_mosa.runs import read_config

    model_overrides = given(args, MODEL_OPTIONS)
    train_overrides = {**(PAPER_RECIPE if args.paper_recipe else {}),
                       **given(args, TRAIN_OPTIONS + ("data", "steps", "progress"))}
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out, the run directory to continue")
        model_given = given(args, ("preset", "attention", "sparsity")) | model_overrides
        if model_given:
            raise ValueError(f"--resume takes the model from the run's config.json; drop {sorted(model_given)}")
        saved = read_config(args.out)
        model_config = MoSAConfig.from_dict(saved["model"])
        train_config = TrainConfig.from_dict({**saved["train"], **train_overrides})
    else:
        attention = args.attention or DEFAULT_ATTENTION
        sparsity = DEFAULT_SPARSITY if args.sparsity is None and attention != "dense" else args.sparsity
        model_config = MoSAConfig.from_preset(args.preset or DEFAULT_PRESET, attention=attention, sparsity=sparsity,
                                              **model_overrides)
        train_config = TrainConfig(**{**training_defaults(args), **train_overrides})
    out = Path(args.out or Path("runs") / run_name(model_config))
    try:
        summary = Trainer(model_config, train_config, out, resume=args.resume).train()
    except NonFiniteLossError as error:
        print(f"mosa train: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the summary; one prints it
        print_summary(out, summary)
    return 0


def training_defaults(args) -> dict:
    """The defaults of a new run, sized for a CPU with or without --data (--paper-recipe overrides them)."""
    return DATA_DEFAULTS if args.data is not None else SYNTHETIC_DEFAULTS


def run_name(config) -> str:
    return f"{config.preset}-{config.attention}" + (f"-s{config.sparsity}" if config.sparsity else "")


def print_summary(out: Path, summary: dict) -> None:
    line = f"val loss {summary['val_loss']:.4f}, val ppl {summary['val_ppl']:.3f}"
    if summary.get("val_bpb") is not None:
        line += f", {summary['val_bpb']:.4f} bits/byte"
    if summary.get("val_recall_accuracy") is not None:
        line += f", recall accuracy {summary['val_recall_accuracy']:.3f}"
    print(f"run {out}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
          f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, {summary['params']:,} params")
    print(f"  {line}")
    print(f"  checkpoint {summary['checkpoint']}; summary {out / 'summary.json'}")
