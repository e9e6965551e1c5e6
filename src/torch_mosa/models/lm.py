"""MoSALM: a decoder-only pre-LayerNorm transformer whose attention layers are chosen by MoSAConfig."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_mosa.checks import check_routing, check_token_ids, value_checks_allowed
from torch_mosa.config import MoSAConfig
from torch_mosa.layers.dense import DenseAttention
from torch_mosa.layers.hybrid import HybridAttention
from torch_mosa.layers.mosa import MoSAAttention
from torch_mosa.ops.documents import DocumentLayout, check_document_ids, document_ids_from_cu_seqlens, document_layout


def build_attention(config: MoSAConfig) -> nn.Module:
    rope = dict(rotate_fraction=config.rotate_fraction, rope_base=config.rope_base)
    if config.attention == "dense":
        return DenseAttention(config.hidden_size, config.num_heads, config.head_dim, **rope)
    counts = config.head_counts()
    kind = "mosa" if config.attention == "pure_mosa" else config.attention
    return HybridAttention(
        config.hidden_size, config.head_dim,
        num_mosa_heads=0 if kind == "local" else counts[kind],
        num_dense_heads=counts.get("dense", 0),
        num_local_heads=counts.get("local", 0),
        window=config.local_window(),
        sparsity=config.sparsity, k=config.k, include_first=config.include_first,
        sparse_kind="mosa" if kind == "local" else kind, per_head_offsets=config.fixed_offsets == "per_head", **rope)


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.up = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: MoSAConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = build_attention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config.hidden_size, config.ffn_size)

    def forward(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", documents=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), attention_mask, routing, documents=documents)
        return x + self.ffn(self.ffn_norm(x))


IGNORE_INDEX = -100  # a target that counts in no loss (F.cross_entropy's default)


class MoSALM(nn.Module):
    """`logits, loss = model(input_ids [B, T], targets=None, attention_mask=None, routing="topk", document_ids=None,
    cu_seqlens=None)`; logits [B, T, vocab].

    loss is the mean next-token cross-entropy over targets != -100 when targets are given, else None; in training
    mode it includes `router_aux_loss_weight` x the MoSA routers' membership loss (kept in `last_router_aux_loss`).
    routing="topk" is the paper's expert-choice routing (non-causal: a token's selection depends on later tokens);
    routing="causal" decides each token's heads when it arrives (thresholds), as generation must.
    Packed documents: `document_ids` [B, T] (contiguous, non-decreasing ids) or, for one flattened row,
    flash-attention's `cu_seqlens` [N + 1]; every document is then computed as if it were alone (attention and
    routing never cross a boundary, RoPE positions restart unless config.restart_positions_per_document is False).
    Under torch.compile pass `documents=model.document_layout(input_ids, document_ids)` instead, built outside the
    compiled call: the layout's host reads then happen there, not inside the graph.
    Input and output embeddings are untied and projections bias-free, which gives the paper's parameter counts.
    """

    def __init__(self, config: MoSAConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mosa_layers = [m for m in self.modules() if isinstance(m, MoSAAttention) and hasattr(m, "router")]
        for layer in self.mosa_layers:
            layer.router_aux_loss = config.router_aux_loss_weight > 0
        self.last_router_aux_loss = None
        self.last_causal_stats = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings, output head and FFN ~ N(0, init_std); attention layers keep their own (reference) init."""
        for module in (self.embed, self.lm_head, *(b.ffn.up for b in self.blocks), *(b.ffn.down for b in self.blocks)):
            nn.init.normal_(module.weight, std=self.config.init_std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embeddings else total

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices only (not norms or vectors)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, seq_len] tensor, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        seq_len = input_ids.shape[1]
        if not 1 <= seq_len <= self.config.max_seq_len:
            raise ValueError(f"input_ids has seq_len={seq_len}; allowed 1..max_seq_len={self.config.max_seq_len}")
        check_token_ids("input_ids", input_ids, self.config.vocab_size)

    def check_targets(self, targets: torch.Tensor, input_ids: torch.Tensor) -> None:
        """targets: ids in [0, vocab_size) or -100 (ignored), shaped like input_ids, at least one not ignored (a
        loss over no token would be NaN)."""
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(targets.shape)}")
        if not value_checks_allowed():  # traced or captured: the host may not read the values
            return
        kept = targets[targets != IGNORE_INDEX]
        if kept.numel() == 0:
            raise ValueError(f"targets are all {IGNORE_INDEX} (ignored): there is no token to compute a loss on")
        check_token_ids("targets", kept, self.config.vocab_size)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, attention_mask=None,
                routing: str = "topk", document_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, documents: DocumentLayout | None = None):
        self.check_input_ids(input_ids)
        check_routing(routing)
        if documents is None:
            documents = self.packed_layout(input_ids, document_ids, cu_seqlens)
        elif document_ids is not None or cu_seqlens is not None:
            raise ValueError("give documents (a DocumentLayout), document_ids or cu_seqlens, not more than one")
        elif tuple(documents.shape) != tuple(input_ids.shape):
            raise ValueError(f"documents describes {tuple(documents.shape)} tokens but input_ids is "
                             f"{tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, attention_mask, routing, documents)
        logits = self.lm_head(self.final_norm(x))
        if routing == "causal" and self.mosa_layers:
            self.last_causal_stats = self.causal_stats(input_ids.numel() if attention_mask is None
                                                       else attention_mask.bool().sum())
        if targets is None:
            return logits, None
        self.check_targets(targets, input_ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        # the routers record their loss only when gradients flow (MoSAAttention.select)
        if self.training and self.config.router_aux_loss_weight > 0 and routing == "topk" and torch.is_grad_enabled():
            aux = [layer.last_router_aux_loss for layer in self.mosa_layers]
            self.last_router_aux_loss = torch.stack(aux).mean()
            for layer in self.mosa_layers:
                layer.last_router_aux_loss = None
            loss = loss + self.config.router_aux_loss_weight * self.last_router_aux_loss
        return logits, loss

    def packed_layout(self, input_ids: torch.Tensor, document_ids=None, cu_seqlens=None):
        """The DocumentLayout of packed input (None without document_ids or cu_seqlens), built once per forward."""
        if document_ids is None and cu_seqlens is None:
            return None
        if document_ids is not None and cu_seqlens is not None:
            raise ValueError("give document_ids or cu_seqlens, not both")
        if cu_seqlens is not None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"cu_seqlens describes one flattened row: input_ids must be [1, total_len], got "
                                 f"{tuple(input_ids.shape)} (use document_ids [B, T] for a batch of packed rows)")
            document_ids = document_ids_from_cu_seqlens(cu_seqlens.to(input_ids.device), input_ids.shape[1])
        check_document_ids(document_ids, tuple(input_ids.shape))
        return document_layout(document_ids.to(input_ids.device), self.config.restart_positions_per_document)

    def document_layout(self, input_ids: torch.Tensor, document_ids=None, cu_seqlens=None):
        """The DocumentLayout of packed input with every host read its layers need already made
        (DocumentLayout.prepare), for `forward(..., documents=)`: build it outside a torch.compile'd call, so
        that the compiled graph has no break. None without document_ids or cu_seqlens."""
        layout = self.packed_layout(input_ids, document_ids, cu_seqlens)
        if layout is None:
            return None
        keys = {key for m in self.modules() if hasattr(m, "document_selections") for key in m.document_selections()}
        return layout.prepare(keys)

    def causal_stats(self, real_tokens) -> dict:
        """What the last causal forward's MoSA layers did, summed over layers, as 0-dim tensors (no host sync):
        `joined` (joins kept), `capacity_overflow` and `heads_per_token_overflow` (joins the causal limits dropped)
        and `slots` (real tokens x MoSA heads, what rates are taken over). Also in `last_causal_stats`."""
        layers = self.mosa_layers
        return {"joined": sum(layer.last_causal_joins for layer in layers),
                "capacity_overflow": sum(layer.last_causal_overflow["capacity"] for layer in layers),
                "heads_per_token_overflow": sum(layer.last_causal_overflow["heads_per_token"] for layer in layers),
                "slots": real_tokens * sum(layer.num_heads for layer in layers)}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Autoregressive generation with causal routing and a sparse KV cache; see torch_mosa.inference.generate."""
        from torch_mosa.inference.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)
