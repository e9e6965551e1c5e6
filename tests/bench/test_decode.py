"""The decode benchmark's pieces on CPU: the yardstick computes what torch-mosa's dense model computes, and a timing
run reports throughput, KV sizes and overflow."""

import torch

from torch_mosa import MoSAConfig, MoSALM
from torch_mosa.bench.decode import Yardstick, build_model, decode_markdown, time_decode
from torch_mosa.inference import decode_one_token, new_cache, prefill


def test_yardstick_equals_torch_mosa_dense():
    model = MoSALM(MoSAConfig.from_preset("micro", vocab_size=50, num_layers=2)).double().eval()
    ids = torch.randint(0, 50, (2, 20))
    yardstick = Yardstick(model, 2, 20)
    cache = new_cache(model, 2, 20, torch.float64, ids.device)
    with torch.no_grad():
        torch.testing.assert_close(yardstick.prefill(ids[:, :12]), prefill(model, ids[:, :12], None, cache),
                                   rtol=1e-10, atol=1e-10)
        for t in range(12, 20):
            position = torch.tensor([t])
            torch.testing.assert_close(yardstick.decode(ids[:, t:t + 1], position),
                                       decode_one_token(model, ids[:, t:t + 1], position, cache), rtol=1e-10, atol=1e-10)


def test_time_decode_reports_speed_sizes_and_overflow():
    model = build_model("mosa 4+17 s32", "micro", "cpu", torch.float32, calibrate_batches=2)
    result = time_decode(model, batch=2, prompt_len=8, new_tokens=3, warmup_tokens=1)
    assert result["tokens_per_s"] > 0 and result["kv_pairs_per_token"] > 0
    assert set(result["overflow"]) == {"capacity", "heads_per_token"}
    dense = time_decode(build_model("dense", "micro", "cpu", torch.float32), 2, 8, 3, warmup_tokens=1)
    rows = [{"model": "dense", "batch": 2, "mode": "eager", **dense},
            {"model": "mosa 4+17 s32", "batch": 2, "mode": "eager", **result}]
    table = decode_markdown(rows, ["# t"])
    assert "| mosa 4+17 s32 | 2 | eager |" in table and "vs torch-mosa dense" in table


def test_run_decode_bench_times_the_reference_decode_beside_the_fused_one():
    from torch_mosa.bench.decode import run_decode_bench

    rows = run_decode_bench(batches=(2,), preset="micro", prompt_len=8, new_tokens=2, device="cpu",
                            dtype=torch.float32, models=("dense", "mosa 4+17 s32"), log=lambda line: None,
                            reference_decode=True)
    assert [row["model"] for row in rows] == ["yardstick", "dense", "mosa 4+17 s32",
                                              "mosa 4+17 s32 [reference decode]"]
    assert all(row["tokens_per_s"] > 0 for row in rows)
