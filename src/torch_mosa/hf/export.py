"""Model folders for the Hugging Face ecosystem: a MoSALM (or a trained run) -> safetensors weights, config.json,
generation_config.json and the tokenizer, loadable by `AutoModelForCausalLM` / `AutoTokenizer` / `pipeline`."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from torch_mosa.data.tokenizer import BPE_FILE, EOT_TOKEN, BPETokenizer, Tokenizer
from torch_mosa.hf.modeling import MoSAForCausalLM
from torch_mosa.models.lm import MoSALM


def to_transformers_tokenizer(tokenizer: BPETokenizer, directory: str | os.PathLike,
                              model_max_length: int) -> PreTrainedTokenizerFast:
    """The BPE tokenizer saved in `directory` (by `tokenizer.save`) as a PreTrainedTokenizerFast: end-of-text is
    eos and pad, padding on the left (batched prompts for generation)."""
    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(f"tokenizer must be a BPETokenizer, got {type(tokenizer).__name__}")
    return PreTrainedTokenizerFast(tokenizer_file=str(Path(directory) / BPE_FILE), eos_token=EOT_TOKEN,
                                   pad_token=EOT_TOKEN, padding_side="left", model_max_length=model_max_length)


def export_model(model: MoSALM, out: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Write `model` (weights, calibrated thresholds included) and its tokenizer into the model folder `out`.

    A BPE tokenizer is saved for transformers (tokenizer_config.json) and for torch_mosa (tokenizer_meta.json), with
    end-of-text as eos and pad token of the model; other kinds (bytes, synthetic) only for torch_mosa, which
    `mosa generate FOLDER` reads.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} exists and is not a directory")
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={model.config.vocab_size}")
    special = {} if tokenizer is None else dict(eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id)
    MoSAForCausalLM.from_mosa(model, **special).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save(out)
        if isinstance(tokenizer, BPETokenizer):
            to_transformers_tokenizer(tokenizer, out, model.config.max_seq_len).save_pretrained(out)
            tokenizer.save(out)  # tokenizer.json exactly as torch_mosa wrote it (transformers adds a post-processor)
    return out


def export_run(run: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, MoSALM, Tokenizer]:
    """A trained run (or one checkpoint of it): its latest checkpoint, with the calibrated causal thresholds it
    holds, and its tokenizer -> the model folder `out`. Returns (out, model, tokenizer)."""
    from torch_mosa.runs import load_model, load_run_tokenizer, resolve_checkpoint

    checkpoint = resolve_checkpoint(run)
    model, _ = load_model(checkpoint)
    tokenizer = load_run_tokenizer(checkpoint)  # the run's own copy: a run exported after being moved still works
    return export_model(model, out, tokenizer), model, tokenizer
