"""torch-mosa: Mixture of Sparse Attention (arXiv 2505.00315) for PyTorch."""

from torch_mosa import flops
from torch_mosa.config import PRESETS, MoSAConfig
from torch_mosa.convert import convert_reference_state_dict
from torch_mosa.layers import (DenseAttention, FixedSparseAttention, HybridAttention, LocalAttention, MoSAAttention,
                               RoutingAttention)
from torch_mosa.models import MoSALM

__version__ = "0.1.0"

__all__ = ["DenseAttention", "FixedSparseAttention", "HybridAttention", "LocalAttention", "MoSAAttention", "MoSAConfig",
           "MoSALM", "PRESETS", "RoutingAttention", "convert_reference_state_dict", "flops"]
