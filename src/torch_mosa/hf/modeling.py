"""MoSAForCausalLM: torch_mosa's MoSALM as a transformers causal LM (outputs, labels -> loss, KV cache, generate)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from torch_mosa.checks import check_routing
from torch_mosa.hf.cache import MoSACache
from torch_mosa.hf.configuration import MoSAConfig
from torch_mosa.models.lm import MoSALM
from torch_mosa.ops.documents import document_ids_from_position_ids

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_GENERATION_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
# transformers 5.24 renamed the KV cache's argument, output field and generate() keyword from `past_key_values` to
# `cache` (the old name still works there, deprecated and logged at every use); both releases are supported
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ModelFolderError(OSError, ValueError):
    """A model folder with missing, corrupt or pickled weights; the message names the path. An OSError as
    transformers raises for missing files, and a ValueError as torch_mosa's CheckpointError."""


class MoSAForCausalLM(PreTrainedModel, GenerationMixin):
    """`model(input_ids [B, T], attention_mask=None, labels=None, cache=None, use_cache=None, routing=None)`
    -> CausalLMOutputWithPast(loss, logits [B, T, vocab], cache). Before transformers 5.24 the cache argument and
    output field are named `past_key_values` (`CACHE_KEY`); either name is accepted.

    labels follow transformers: the same tokens as input_ids (shifted inside), -100 ignored. A forward with a cache
    (`use_cache`, the default in eval mode, or a MoSACache in `cache`) runs causal routing: the prefill when
    the cache is empty, token-by-token decoding after. `routing` overrides `config.routing` for one call ("topk" works
    without a cache only). Positions follow the token order, left padding included, as in `MoSALM.generate`.
    Packed rows (training, evaluation): `position_ids` that restart at 0 with every document, as transformers'
    DataCollatorWithFlattening makes them, or torch_mosa's `document_ids`; each document is then computed as if it
    were alone (docs/training.md, Packed documents), with no cache.
    """

    config_class = MoSAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: MoSAConfig):
        super().__init__(config)
        self.model = MoSALM(config.to_mosa_config())
        self.post_init()

    def _init_weights(self, module):
        """Nothing: MoSALM initialises its own parameters (the attention layers keep the reference init)."""

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    @classmethod
    def from_mosa(cls, model: MoSALM, **config_kwargs) -> "MoSAForCausalLM":
        """A copy of a torch_mosa MoSALM (weights, thresholds, dtype, device); config_kwargs go to MoSAConfig."""
        if not isinstance(model, MoSALM):
            raise TypeError(f"model must be a torch_mosa MoSALM, got {type(model).__name__}")
        parameter = next(model.parameters())
        wrapped = cls(MoSAConfig.from_mosa_config(model.config, **config_kwargs))
        wrapped.model.load_state_dict(model.state_dict())
        return wrapped.to(device=parameter.device, dtype=parameter.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' from_pretrained, from safetensors only (unpickling weights can execute code), refusing
        weights that leave a parameter missing or unused."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False: MoSA models load safetensors weights only, since unpickling "
                             "can execute code")
        if pretrained_model_name_or_path is not None and os.path.isdir(pretrained_model_name_or_path):
            check_weights_folder(pretrained_model_name_or_path)
        return_info = kwargs.pop("output_loading_info", False)
        kwargs["use_safetensors"] = True
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        misfit = {key: list(info[key]) for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
        if misfit:
            raise ValueError(f"the weights of {str(pretrained_model_name_or_path)!r} do not fit the model of its "
                             f"config.json: {misfit}")
        return (model, info) if return_info else model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: MoSACache | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, routing: str | None = None,
                past_key_values: MoSACache | None = None, **kwargs) -> CausalLMOutputWithPast:
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported by MoSA models: pass input_ids")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("give the KV cache as cache or as past_key_values (its name before transformers 5.24), "
                             "not both")
        cache = cache if cache is not None else past_key_values
        document_ids = self._packed_documents(kwargs.get("position_ids"), kwargs.get("document_ids"))
        if document_ids is not None:  # packed rows: no padding, no cache (training and evaluation)
            if use_cache or cache is not None:
                raise ValueError("packed input (position_ids restarting per document, or document_ids) takes no KV "
                                 "cache: pass use_cache=False and no cache (past_key_values)")
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("packed input holds no padding: its attention_mask must be all ones (or None)")
            attention_mask, use_cache = None, False
        routing = self.config.routing if routing is None else routing
        check_routing(routing)
        self.model.check_input_ids(input_ids)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        if cache is not None:
            check_cache(cache)
            if routing != "causal":
                raise ValueError(f"routing={routing!r} cannot use a KV cache: only causal routing decides a token's "
                                 "heads when it arrives")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and routing == "causal"
        if cache is None and use_cache:
            cache = MoSACache(self.model, input_ids.shape[0], self.config.max_seq_len, input_ids.device)

        # transformers' labels are the inputs; MoSALM's targets are the next tokens
        targets = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100)
        if cache is None:
            logits, loss = self.model(input_ids, targets, attention_mask, routing, document_ids=document_ids)
        else:
            if cache.get_seq_length() == 0:
                logits = cache.prefill(self.model, input_ids, attention_mask)
            else:
                logits = cache.decode(self.model, input_ids, attention_mask)
            loss = None if targets is None else F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: cache})

    @staticmethod
    def _packed_documents(position_ids, document_ids):
        """Document ids of packed input, from position ids restarting at 0 per document (transformers'
        DataCollatorWithFlattening) or given directly; None for ordinary rows."""
        if position_ids is not None and document_ids is not None:
            raise ValueError("give position_ids (restarting per packed document) or document_ids, not both")
        if position_ids is not None:
            return document_ids_from_position_ids(position_ids)
        return document_ids

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                                      max_cache_length: int) -> None:
        """generate(): a MoSACache for the prompt and every new token; greedy decoding and sampling only."""
        if generation_mode not in _GENERATION_MODES:
            raise ValueError(f"MoSA models generate by greedy decoding or sampling (num_beams=1, no assistant model), "
                             f"got generation mode {generation_mode!s}")
        cache = model_kwargs.get(CACHE_KEY)
        if cache is not None:
            check_cache(cache)
            return
        if generation_config.use_cache is False:
            return
        # generate() sizes caches for max_length - 1 tokens (the last one is never fed back); torch_mosa's generate
        # sizes them for all max_length, and equal buffer sizes give bit-identical attention sums, hence the +1.
        model_kwargs[CACHE_KEY] = MoSACache(
            self.model, batch_size * generation_config.num_return_sequences, max_cache_length + 1, self.device)


def check_cache(cache) -> None:
    """A KV cache handed to the model (as `cache`, or `past_key_values` before transformers 5.24) must be ours."""
    if not isinstance(cache, MoSACache):
        raise TypeError(f"the KV cache (cache, past_key_values) must be a torch_mosa.hf.MoSACache, got "
                        f"{type(cache).__name__}")


def check_weights_folder(directory: str | os.PathLike) -> None:
    """A model folder must hold readable safetensors weights; pickled weights are refused, never opened."""
    from safetensors import safe_open

    path = Path(directory)
    if (path / WEIGHTS_INDEX_FILE).is_file():
        try:
            files = sorted(set(json.loads((path / WEIGHTS_INDEX_FILE).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as error:
            raise ModelFolderError(f"{path / WEIGHTS_INDEX_FILE} is corrupt: {error}") from None
    elif (path / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ModelFolderError(f"model folder {str(path)!r} holds pickled weights {pickled} and no "
                                   f"{WEIGHTS_FILE}: torch_mosa loads safetensors only, since unpickling can execute code")
        raise ModelFolderError(f"model folder {str(path)!r} has no {WEIGHTS_FILE} (the weights are missing)")
    for name in files:
        if not (path / name).is_file():
            raise ModelFolderError(f"model folder {str(path)!r} is missing the weights file {name}")
        try:
            with safe_open(path / name, framework="pt") as weights:
                weights.keys()
        except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError for malformed files
            raise ModelFolderError(f"weights file {str(path / name)!r} is corrupt: {error}") from None
