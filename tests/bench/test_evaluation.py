"""The evaluation-speed benchmark's pieces on CPU: the three routings it times, and its table."""

import torch

from torch_mosa.bench.evaluation import eval_routing_markdown, run_eval_routing_bench


def test_eval_routing_bench_times_topk_and_causal_with_and_without_capacity():
    rows = run_eval_routing_bench("mosa IsoFLOP s64", preset="micro", batch=2, seq_len=64, device="cpu",
                                  dtype=torch.float32, log=lambda line: None)
    assert [(row["routing"], row["capacity"] is None) for row in rows] == [("topk", True), ("causal", False),
                                                                            ("causal", True)]
    assert rows[0]["vs_topk"] == 1.0 and 0 < rows[1]["capacity"] < 64
    table = eval_routing_markdown(rows, ["# t"])
    assert "| top-k (sees the future) | - | 2 x 64 |" in table
    assert f"| causal | {rows[1]['capacity']} | 2 x 64 |" in table and "| causal | none (width T) |" in table
