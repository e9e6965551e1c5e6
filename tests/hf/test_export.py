"""The exported folder in the ecosystem: AutoTokenizer, pipeline("text-generation"), `mosa export-hf` and
`mosa generate FOLDER`."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch_mosa.hf as mosa_hf  # noqa: E402
from torch_mosa import cli  # noqa: E402
from torch_mosa.data.tokenizer import load_tokenizer  # noqa: E402

from .conftest import TEXT, micro_lm  # noqa: E402

TINY = ["--num-layers", "1", "--hidden-size", "32", "--ffn-size", "64", "--head-dim", "8", "--max-seq-len", "64",
        "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]


def mosa(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_auto_tokenizer_matches_ours(exported_mosa, tokenizer):
    _, folder = exported_mosa
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = TEXT[:200]
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token_id == hf_tokenizer.pad_token_id == tokenizer.eot_id
    assert hf_tokenizer.padding_side == "left"
    assert load_tokenizer(folder).encode(text) == tokenizer.encode(text)  # torch_mosa reads the folder too


def test_pipeline_generates_text(exported_mosa):
    model, folder = exported_mosa
    generator = transformers.pipeline("text-generation", model=str(folder))
    assert isinstance(generator.model, mosa_hf.MoSAForCausalLM)
    out = generator(["It was a dark", "the rain"], max_new_tokens=6, do_sample=False)
    texts = [result[0]["generated_text"] for result in out]
    assert texts[0].startswith("It was a dark") and texts[1].startswith("the rain")
    assert len(texts[0]) > len("It was a dark")
    # the pipeline's greedy tokens are torch_mosa's
    ids = generator.tokenizer("It was a dark", return_tensors="pt").input_ids
    expected = model.generate(ids, 6, stop_tokens=[generator.tokenizer.eos_token_id])
    assert texts[0] == generator.tokenizer.decode(expected[0])


def test_export_model_errors(tmp_path, tokenizer):
    model = micro_lm("dense")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="out="):
        mosa_hf.export_model(model, tmp_path / "file", tokenizer)
    small = micro_lm("dense")
    small.config.vocab_size = 100
    with pytest.raises(ValueError, match="vocab_size=100"):
        mosa_hf.export_model(small, tmp_path / "small", tokenizer)


def test_export_hf_cli_then_generate_from_folder(tmp_path, shared_data, capsys):
    run = tmp_path / "run"
    assert mosa("train", "--out", run, "--steps", 2, "--data", shared_data / "gutenberg" / "01_*.txt",
                "--tokenizer", "bpe", "--vocab-size", 300, "--attention", "mosa", "--sparsity", 4, *TINY) == 0
    assert mosa("calibrate", run, "--batches", 1, "--seq-len", 32) == 0
    capsys.readouterr()
    folder = tmp_path / "hf"
    assert mosa("export-hf", run, "--out", folder) == 0
    captured = capsys.readouterr()
    assert f"wrote {folder}" in captured.out and "uncalibrated" not in captured.err
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mosa" and config["attention"] == "mosa"

    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    from torch_mosa.train.checkpoint import load_model

    trained, _ = load_model(run)
    for name, tensor in trained.state_dict().items():  # calibrated thresholds included
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert any(layer.causal_threshold.any() for layer in loaded.model.mosa_layers)

    assert mosa("generate", run, "--prompt", "Alice was", "--max-new-tokens", 5, "--no-stop") == 0
    from_run = capsys.readouterr().out
    assert mosa("generate", folder, "--prompt", "Alice was", "--max-new-tokens", 5, "--no-stop") == 0
    assert capsys.readouterr().out == from_run

    assert mosa("export-hf", tmp_path / "nowhere", "--out", tmp_path / "x") == 2
    assert "nowhere" in capsys.readouterr().err
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    assert mosa("generate", folder, "--prompt", "Alice") == 2
    assert "corrupt" in capsys.readouterr().err
