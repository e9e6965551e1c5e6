import math

import pytest
import torch
import torch.nn.functional as F

from torch_mosa.data.shards import TokenDataset, prepare_corpus
from torch_mosa.models.lm import MoSALM
from torch_mosa.train import evaluate


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 8)
    return prepare_corpus(root, root / "shards", tokenizer="byte", val_docs=2, progress=False)["out_dir"]


def test_loss_is_the_token_mean_over_non_overlapping_windows(byte_data, tiny_model):
    data = TokenDataset(byte_data, "val")
    model = MoSALM(tiny_model(vocab_size=data.vocab_size)).eval()
    result = evaluate(model, data, batch_size=3, seq_len=16)
    tokens = torch.from_numpy(data.window(0, data.num_tokens).astype("int64"))
    windows = (data.num_tokens - 1) // 16
    x = torch.stack([tokens[i * 16:(i + 1) * 16] for i in range(windows)])
    y = torch.stack([tokens[i * 16 + 1:(i + 1) * 16 + 1] for i in range(windows)])
    with torch.no_grad():
        expected = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
    assert result["tokens"] == windows * 16
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-6)
    bytes_predicted = (y != data.eot_id).sum().item()
    assert result["bpb"] == pytest.approx(expected * y.numel() / math.log(2) / bytes_predicted, rel=1e-6)


def test_max_batches_and_forward_kwargs(byte_data, tiny_model):
    data = TokenDataset(byte_data, "val")
    model = MoSALM(tiny_model(vocab_size=data.vocab_size))
    seen = []

    def forward(input_ids, **kwargs):
        seen.append(kwargs)
        return MoSALM.forward(model, input_ids)

    model.forward = forward
    result = evaluate(model, data, batch_size=2, seq_len=16, max_batches=1, routing="causal")
    assert result["tokens"] == 2 * 16
    assert seen == [{"routing": "causal"}]
    assert model.training  # evaluation restores the mode it found
