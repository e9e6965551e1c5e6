from torch_mosa.layers.dense import DenseAttention
from torch_mosa.layers.fixed import FixedSparseAttention
from torch_mosa.layers.hybrid import HybridAttention
from torch_mosa.layers.local import LocalAttention
from torch_mosa.layers.mosa import MoSAAttention
from torch_mosa.layers.routing import RoutingAttention

__all__ = ["DenseAttention", "FixedSparseAttention", "HybridAttention", "LocalAttention", "MoSAAttention",
           "RoutingAttention"]
