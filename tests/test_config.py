import pytest
import torch

from torch_mosa import MoSAConfig, MoSALM

PAPER_PARAMS = {"tiny": 28e6, "small": 113e6, "medium": 210e6, "large": 516e6}


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMS))
def test_dense_preset_parameter_counts(preset):
    with torch.device("meta"):
        params = MoSALM(MoSAConfig.from_preset(preset)).num_parameters()
    assert round(params / 1e6) == round(PAPER_PARAMS[preset] / 1e6)


def test_mosa_preset_is_isoflop_hybrid():
    config = MoSAConfig.from_preset("tiny", attention="mosa", sparsity=64)
    assert config.head_counts() == {"dense": 4, "mosa": 505}
    with torch.device("meta"):
        assert round(MoSALM(config).num_parameters() / 1e6) == 423  # SPEC §4: Tiny rho=64 has 423M parameters


def test_pure_mosa_keeps_no_dense_heads():
    assert MoSAConfig.from_preset("tiny", attention="pure_mosa", sparsity=2).head_counts() == {"mosa": 23}


def test_round_trip_dict():
    config = MoSAConfig.from_preset("micro", attention="routing", sparsity=8)
    assert MoSAConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="huge"), "preset"),
    (dict(name="tiny", attention="sparse"), "attention"),
    (dict(name="tiny", attention="mosa"), "sparsity"),
    (dict(name="tiny", attention="mosa", sparsity=0), "sparsity"),
    (dict(name="tiny", attention="fixed", sparsity=None, k=16), "k"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoSAConfig.from_preset(**kwargs)


@pytest.mark.parametrize("attention", ["dense", "fixed", "local", "routing"])
def test_router_aux_loss_needs_mosa_routers(attention):
    """Only MoSA heads have routers to train; other kinds used to crash every training step (issue 14, defect 1)."""
    with pytest.raises(ValueError, match=r"router_aux_loss_weight.*'mosa', 'pure_mosa'"):
        MoSAConfig.from_preset("micro", attention=attention, sparsity=None if attention == "dense" else 4,
                               router_aux_loss_weight=0.1)


def test_router_aux_loss_weight_zero_is_allowed_everywhere():
    for attention in ("dense", "fixed", "local", "routing"):
        MoSAConfig.from_preset("micro", attention=attention, sparsity=None if attention == "dense" else 4,
                               router_aux_loss_weight=0.0)


def test_unknown_field_in_dict():
    with pytest.raises(ValueError, match="unknown"):
        MoSAConfig.from_dict({"hidden": 3})
