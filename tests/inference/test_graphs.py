"""The decode step replayed as a CUDA graph computes what the eager step computes (GPU only)."""

import pytest
import torch

from torch_mosa import MoSAConfig, MoSALM
from torch_mosa.inference import (GraphedDecodeStep, calibrate_causal_thresholds, decode_one_token, new_cache, prefill,
                                  set_causal_limits)

pytestmark = pytest.mark.cuda  # CUDA graphs need a GPU; tests/conftest.py skips them without one


@pytest.mark.parametrize("attention,compile", [("dense", False), ("mosa", False), ("fixed", False), ("local", False),
                                               ("dense", True), ("mosa", True)])
def test_graphed_decode_equals_eager(attention, compile):
    config = MoSAConfig.from_preset("micro", attention=attention, sparsity=None if attention == "dense" else 4,
                                    vocab_size=64, window=8 if attention == "local" else None)
    model = MoSALM(config).cuda().eval()
    ids = torch.randint(0, 64, (3, 40), device="cuda")
    if model.mosa_layers:
        calibrate_causal_thresholds(model, [ids])
        set_causal_limits(model, capacity=12, heads_per_token=4)
    with torch.no_grad():
        eager_cache, graph_cache = (new_cache(model, 3, 40, torch.float32, ids.device) for _ in range(2))
        step = GraphedDecodeStep(model, graph_cache, 3, ids.device, compile=compile)
        torch.testing.assert_close(prefill(model, ids[:, :16], None, graph_cache),
                                   prefill(model, ids[:, :16], None, eager_cache))
        position = torch.tensor([16], device="cuda")
        for t in range(16, 40):
            expected = decode_one_token(model, ids[:, t:t + 1], position, eager_cache)
            torch.testing.assert_close(step(ids[:, t:t + 1], position), expected, rtol=1e-4, atol=1e-4)
            position += 1
        assert eager_cache.overflow() == graph_cache.overflow()
