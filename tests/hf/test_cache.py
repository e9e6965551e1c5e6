"""The MoSA cache's transformers layers are typed by what each block's torch_mosa cache holds: dense heads only,
local heads only (sliding), dense and local heads, or sparse heads (with the block's dense or local heads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch_mosa.hf as mosa_hf  # noqa: E402
from torch_mosa import MoSAConfig, MoSALM  # noqa: E402

from .conftest import VOCAB  # noqa: E402

# attention settings -> (layer type, is_sliding, max length of a layer in a cache of max_len=40)
LAYOUTS = {
    "dense": (dict(attention="dense"), mosa_hf.DenseCacheLayer, False, 40),
    "local": (dict(attention="local", sparsity=4, num_dense_heads=2), mosa_hf.HybridCacheLayer, False, 40),
    "local_only": (dict(attention="local", sparsity=4, num_dense_heads=0), mosa_hf.SlidingCacheLayer, True, 16),
    "mosa": (dict(attention="mosa", sparsity=4, num_dense_heads=2), mosa_hf.MoSACacheLayer, False, 40),
    "pure_mosa": (dict(attention="pure_mosa", sparsity=4), mosa_hf.MoSACacheLayer, False, 40),
    "fixed": (dict(attention="fixed", sparsity=4, num_dense_heads=2), mosa_hf.MoSACacheLayer, False, 40),
}


def model_of(kind: str) -> MoSALM:
    torch.manual_seed(0)
    config = MoSAConfig(vocab_size=VOCAB, num_layers=2, hidden_size=64, head_dim=16, num_heads=4, max_seq_len=64,
                        init_std=0.3, **LAYOUTS[kind][0])
    model = MoSALM(config).eval()
    with torch.no_grad():
        for layer in model.mosa_layers:
            layer.causal_threshold.normal_(0.3, 0.3)
    return model


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_layer_types_follow_the_blocks_caches(kind):
    _, layer_type, sliding, max_length = LAYOUTS[kind]
    model = model_of(kind)
    cache = mosa_hf.MoSACache(model, 2, 40)
    assert [type(layer) for layer in cache.layers] == [layer_type] * 2
    assert cache.is_sliding == [sliding] * 2
    assert [layer.get_max_length() for layer in cache.layers] == [max_length] * 2
    assert cache.get_mask_sizes(5, 0) == (5, 0)
    input_ids = torch.randint(1, VOCAB, (2, 30))
    with torch.no_grad():
        cache.prefill(model, input_ids, None)  # a prompt longer than a sliding layer's window fits max_len
        cache.decode(model, input_ids[:, :2])
    assert cache.get_seq_length() == 32
    # what each layer holds is its torch_mosa cache's count, and they add up to the model cache's
    assert sum(layer.pairs() for layer in cache.layers) == cache.model_cache.pairs() > 0
    assert sum(layer.bytes_held() for layer in cache.layers) == cache.model_cache.bytes_held()
    assert sum(layer.bytes_allocated() for layer in cache.layers) == cache.model_cache.bytes_allocated()
    layer = cache.layers[0]
    if sliding:  # as transformers' DynamicSlidingWindowLayer: the window's last tokens and the new ones
        assert layer.sliding_window == 16 and layer.pairs() == 2 * 16 * layer.parts[0].k.shape[1]
        assert layer.get_mask_sizes(1) == (16, 32 - 16 + 1)
    else:
        assert layer.get_mask_sizes(1) == (33, 0)
    if layer_type is mosa_hf.MoSACacheLayer:
        assert layer.overflow() == {"capacity": 0, "heads_per_token": 0}
    if kind == "dense":
        assert layer.pairs() == 2 * 32 * model.config.num_heads
    assert repr(layer).startswith(layer_type.__name__ + "(")


def test_layers_refuse_updates_offload_and_beam_search():
    cache = mosa_hf.MoSACache(model_of("mosa"), 1, 16)
    layer = cache.layers[0]
    states = torch.zeros(1, 4, 1, 16)
    with pytest.raises(NotImplementedError, match="prefill and decode"):
        layer.update(states, states)
    with pytest.raises(NotImplementedError, match="offloading"):
        layer.offload()
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))
