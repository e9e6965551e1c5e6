"""Micro MoSA models and a small BPE tokenizer made in the test, exported as Hugging Face model folders."""

import pytest
import torch

from torch_mosa import MoSAConfig, MoSALM
from torch_mosa.data.tokenizer import train_bpe_tokenizer

TEXT = ("It was a dark and stormy night; the rain fell in torrents, except at occasional intervals, when it was "
        "checked by a violent gust of wind which swept up the streets. ") * 8
VOCAB = 320
# the head kinds whose caches differ: dense (every token), hybrid MoSA (per-head selections), fixed (strided), hybrid
# local (a window)
KINDS = {"dense": dict(attention="dense"),
         "local": dict(attention="local", sparsity=4, num_dense_heads=2),
         "mosa": dict(attention="mosa", sparsity=4, num_dense_heads=2),
         "fixed": dict(attention="fixed", sparsity=4, num_dense_heads=2)}


def micro_lm(kind: str) -> MoSALM:
    """A 2-layer model with weights large enough that greedy decoding does not repeat one token, and causal
    thresholds that make every MoSA head keep part of the tokens (as calibration would)."""
    config = MoSAConfig(vocab_size=VOCAB, num_layers=2, hidden_size=64, head_dim=16, num_heads=4, max_seq_len=64,
                        init_std=0.3, **KINDS[kind])
    model = MoSALM(config).eval()
    with torch.no_grad():
        for layer in model.mosa_layers:
            layer.causal_threshold.normal_(0.3, 0.3)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer([TEXT], vocab_size=VOCAB)


def export(kind: str, directory, tokenizer):
    from torch_mosa.hf import export_model

    torch.manual_seed(0)
    model = micro_lm(kind)
    return model, export_model(model, directory / kind, tokenizer)


@pytest.fixture(params=list(KINDS))
def exported(request, tmp_path, tokenizer):
    """(torch_mosa model, its exported folder) for each attention kind."""
    return export(request.param, tmp_path, tokenizer)


@pytest.fixture
def exported_mosa(tmp_path, tokenizer):
    """(torch_mosa model, its exported folder) for the hybrid MoSA model."""
    return export("mosa", tmp_path, tokenizer)
