from torch_mosa.models.lm import MoSALM

__all__ = ["MoSALM"]
