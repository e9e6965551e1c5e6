"""`mosa prepare`: tokenize a corpus once into memory-mapped train/val shards plus its tokenizer."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="tokenize text into train/val token shards", description=__doc__)
    p.add_argument("data", help="text files, directories, globs, tar archives, .jsonl, .parquet, or "
                                "hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--out", required=True, help="directory for the shards, meta.json and the tokenizer")
    p.add_argument("--tokenizer", default="bpe",
                   help="bpe (trained here), byte, or the directory of a saved tokenizer (default bpe)")
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size (default 8000, as the paper)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    p.add_argument("--max-docs", type=int, default=None, help="read only the first N documents")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/hf records holding the text")
    p.add_argument("--overwrite", action="store_true", help="replace a corpus already prepared in --out")
    p.set_defaults(run=run)


def run(args) -> int:
    import shutil
    from pathlib import Path

    from torch_mosa.data.shards import prepare_corpus

    created = not Path(args.out).exists()
    try:
        meta = prepare_corpus(args.data, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                              val_fraction=args.val_fraction, seed=args.seed, max_docs=args.max_docs,
                              text_field=args.text_field, overwrite=args.overwrite)
    except BaseException:
        if created:  # a failed preparation leaves no half-written or empty directory
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    tokens, docs = meta["num_tokens"], meta["num_docs"]
    print(f"prepared {meta['out_dir']}: {meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']}, "
          f"train {tokens['train']:,} tokens ({docs['train']} docs), val {tokens['val']:,} tokens ({docs['val']} docs)")
    return 0
