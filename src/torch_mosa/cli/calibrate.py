"""`mosa calibrate`: set a checkpoint's causal-routing thresholds so each MoSA head keeps about T/sparsity tokens
(calibrated on the training split of its run's data, or of --data), and write them into the checkpoint."""

from __future__ import annotations

# Batches read by default: seconds for the micro preset on a CPU (each MoSA layer makes a pass over them).
DEFAULT_BATCHES = 2


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="calibrate causal-routing thresholds of a checkpoint", description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest checkpoint)")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES,
                   help=f"training batches to calibrate on, spread over the split (default {DEFAULT_BATCHES}: "
                        "seconds on a CPU; more give steadier thresholds)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's maximum)")
    p.add_argument("--data", default=None,
                   help="a prepared shard directory to calibrate on (default: the run's own training data)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from torch_mosa.checks import resolve_device
    from torch_mosa.data.shards import TokenDataset
    from torch_mosa.inference.calibrate import calibrate_on_dataset
    from torch_mosa.runs import load_model, resolve_checkpoint, training_data_dir, write_model_weights

    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    device = resolve_device(args.device)
    path = resolve_checkpoint(args.checkpoint)
    model, config = load_model(path, device)
    if not model.mosa_layers:
        raise ValueError(f"{path} has no routed MoSA heads (attention={config.attention!r}): nothing to calibrate")
    data_dir = training_data_dir(path, args.data)
    train = TokenDataset(data_dir, "train")
    seq_len = args.seq_len or config.max_seq_len
    print(f"calibrating on {args.batches * args.batch_size:,} windows of {seq_len} tokens ({args.batches} batches of "
          f"{args.batch_size}) spread over the {train.num_tokens:,}-token training split of {data_dir}", flush=True)
    report = calibrate_on_dataset(model, train, args.batch_size, seq_len, args.batches, device,
                                  progress=args.progress)
    write_model_weights(path, model.state_dict())
    for layer in report:
        print(f"MoSA layer {layer['layer']}: keeps {layer['kept_fraction']:.4f} of tokens "
              f"(top-k keeps {layer['target_fraction']:.4f}); mean threshold {layer['threshold_mean']:+.3f}")
    print(f"wrote calibrated thresholds into {path}")
    return 0
