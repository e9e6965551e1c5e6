"""Hugging Face transformers integration: `import torch_mosa.hf` registers MoSA with AutoConfig and
AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(folder)`, `generate()` and `pipeline()` work.

Needs the `hf` extra (`pip install "torch-mosa[hf]"`, transformers 5.x); torch_mosa itself never imports it.
"""

try:
    import transformers
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError('torch_mosa.hf needs transformers 5.x: pip install "torch-mosa[hf]"') from error
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f'torch_mosa.hf needs transformers 5.x, found {transformers.__version__}: '
                      'pip install "torch-mosa[hf]"')

from torch_mosa.hf.cache import (  # noqa: E402 - after the version check
    DenseCacheLayer, HybridCacheLayer, MoSACache, MoSACacheLayer, SlidingCacheLayer, TorchMoSACacheLayer, cache_layer)
from torch_mosa.hf.configuration import MoSAConfig  # noqa: E402
from torch_mosa.hf.export import export_model, export_run, to_transformers_tokenizer  # noqa: E402
from torch_mosa.hf.modeling import ModelFolderError, MoSAForCausalLM  # noqa: E402

transformers.AutoConfig.register(MoSAConfig.model_type, MoSAConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(MoSAConfig, MoSAForCausalLM, exist_ok=True)

__all__ = ["DenseCacheLayer", "HybridCacheLayer", "ModelFolderError", "MoSACache", "MoSACacheLayer", "MoSAConfig",
           "MoSAForCausalLM", "SlidingCacheLayer", "TorchMoSACacheLayer", "cache_layer", "export_model", "export_run",
           "to_transformers_tokenizer"]
