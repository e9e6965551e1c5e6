"""`mosa inspect`: which tokens each MoSA head picks on a given text. Draws a token x head grid per layer (router
score as colour) and prints each head's most-picked tokens."""

from __future__ import annotations

HEADS = 32


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show which tokens the MoSA heads of a checkpoint pick on a text",
                              description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest checkpoint)")
    p.add_argument("--text", required=True, help="the text to route (at most the model's max_seq_len tokens)")
    p.add_argument("--out", default="heads.png", help="PNG file to write (default heads.png)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="MoSA layers to draw, counted from 0 (default: the first, middle and last)")
    p.add_argument("--heads", type=int, default=HEADS, help=f"most heads drawn per layer (default {HEADS})")
    p.add_argument("--top", type=int, default=5, help="most-picked tokens printed per head (default 5)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ... (default auto)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from torch_mosa.checks import resolve_device
    from torch_mosa.inference.router_health import head_selections, most_picked_tokens
    from torch_mosa.runs import load_model, load_run_tokenizer, resolve_checkpoint
    from torch_mosa.train.plots import plot_head_selections

    if args.heads < 1:
        raise ValueError(f"--heads must be at least 1, got {args.heads}")
    device = resolve_device(args.device)
    path = resolve_checkpoint(args.checkpoint)
    model, _ = load_model(path, device)
    tokenizer = load_run_tokenizer(path)
    ids = tokenizer.encode(args.text)
    if not ids:
        raise ValueError("--text is empty after tokenization: give at least one character")
    selections = head_selections(model, torch.tensor([ids], device=device))
    layers = chosen_layers(args.layers, len(selections))
    labels = [token_label(tokenizer.decode([token])) for token in ids]
    shown = {number: selections[number] for number in layers}
    out = plot_head_selections(shown, labels, args.out, max_heads=args.heads,
                               title=f"{path}: {len(ids)} tokens")
    for number, selection in shown.items():
        num_heads = selection.indices.shape[1]
        printed = min(num_heads, args.heads)
        note = f" (first {printed} of {num_heads} heads; raise --heads for more)" if printed < num_heads else ""
        print(f"MoSA layer {number}: {num_heads} heads, {selection.indices.shape[2]} tokens each{note}")
        for head, picked in enumerate(most_picked_tokens(selection, labels, args.top)[:printed]):
            print(f"  head {head:3d}: " + "  ".join(f"{label} x{count}" for label, count in picked))
    print(f"wrote {out}")
    return 0


def chosen_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    """--layers checked against the model's MoSA layers, or the first, middle and last (distinct, in order)."""
    if layers is None:
        return sorted({0, num_layers // 2, num_layers - 1})
    wrong = [layer for layer in layers if not 0 <= layer < num_layers]
    if wrong:
        raise ValueError(f"--layers {wrong} out of range: the model has {num_layers} MoSA layers, 0..{num_layers - 1}")
    return list(dict.fromkeys(layers))


def token_label(text: str) -> str:
    """A token as it reads on an axis: line breaks, tabs and spaces made visible."""
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423") or "\u2205"
