"""`mosa calibrate`: set a checkpoint's causal-routing thresholds so each MoSA head keeps about T/sparsity tokens
(calibrated on its run's training data), and write them into the checkpoint."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="calibrate causal-routing thresholds of a checkpoint", description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest checkpoint)")
    p.add_argument("--batches", type=int, default=8, help="training batches to calibrate on (default 8)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's maximum)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=run)


def run(args) -> int:
    from torch_mosa.train.checkpoint import load_model, resolve_checkpoint, write_model_weights
    from torch_mosa.train.evaluate import calibrate_on_training_data

    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    path = resolve_checkpoint(args.checkpoint)
    model, config = load_model(path, args.device)
    if not model.mosa_layers:
        raise ValueError(f"{path} has no routed MoSA heads (attention={config.attention!r}): nothing to calibrate")
    report = calibrate_on_training_data(model, path, args.batch_size, args.seq_len or config.max_seq_len,
                                        args.batches, args.device)
    write_model_weights(path, model.state_dict())
    for layer in report:
        print(f"MoSA layer {layer['layer']}: keeps {layer['kept_fraction']:.4f} of tokens "
              f"(top-k keeps {layer['target_fraction']:.4f}); mean threshold {layer['threshold_mean']:+.3f}")
    print(f"wrote calibrated thresholds into {path}")
    return 0
