"""Router health: statistics of MoSA heads' token selections that show when a routed model fails quietly.

Expert-choice routers fail without raising anything: heads die (their scores collapse), every head piles onto the
same tokens, or the choices drift to the first token or to the end of the window. `selection_health` reduces one
layer's selection to a few numbers; `model_router_health` does it for every MoSA layer of a model from the
selections its last forward recorded (`record_selections`), so the trainer needs no second forward.

Metrics of one layer (every one a plain float; see docs/training.md for how to read them):
  score_mean, score_std   router scores (sigmoid) of the taken slots
  unchosen_frac           share of real tokens that no head of the layer took
  heads_per_token         taken slots per real token (E k / T under top-k: fixed; it moves under causal routing)
  jaccard                 mean Jaccard overlap of two heads' token sets, over up to `max_pairs` fixed head pairs
  first_token_share       share of taken slots holding the first real token (1/k with include_first)
  tail_share              share of taken slots in the last 10% of the window (about 0.1 for position-blind heads)
  join_rate, join_target  causal routing only: taken slots per (real token, head), and the k/T it is calibrated to

Everything is computed on the selection's device in a few vectorised reductions ([B, E, K] scatters and one
[B, 2P, T] membership table), with one host read per call of `model_router_health`.
"""

from __future__ import annotations

import functools

import torch

from torch_mosa.checks import check_positive_int, first_real_position

METRICS = ("score_mean", "score_std", "unchosen_frac", "heads_per_token", "jaccard", "first_token_share",
           "tail_share", "join_rate", "join_target")
TAIL_FRACTION = 0.1


def tail_length(seq_len: int) -> int:
    """Tokens in "the last 10% of the window": max(1, T // 10), so short windows still have a tail."""
    return max(1, int(seq_len * TAIL_FRACTION))


@functools.lru_cache(maxsize=64)
def head_pairs(num_heads: int, max_pairs: int) -> torch.Tensor:
    """[P, 2] long (CPU) pairs of distinct heads: all of them when there are at most `max_pairs`, else `max_pairs`
    drawn once with a fixed seed. The same pairs at every call keep a run's Jaccard curve comparable over steps."""
    every = torch.combinations(torch.arange(num_heads), 2)
    if len(every) <= max_pairs:
        return every
    generator = torch.Generator().manual_seed(0)
    return every[torch.randperm(len(every), generator=generator)[:max_pairs]]


def selection_health(indices: torch.Tensor, scores: torch.Tensor, seq_len: int, attention_mask=None,
                     join_target: float | None = None, max_pairs: int = 32) -> dict[str, torch.Tensor]:
    """One layer's selection -> {metric: 0-dim float32 tensor} (names in METRICS, see the module docstring).

    indices [B, E, K] positions, scores [B, E, K] router scores with 0 marking an empty slot (padding, or a causal
    head's unused width); attention_mask [B, T] (1 = real) or None. `join_target` (the share of tokens each head
    should keep, k/T) marks the selection as causal: join_rate and join_target are then reported. Metrics without a
    value (jaccard with one head) are left out.
    """
    if indices.dim() != 3 or indices.shape != scores.shape:
        raise ValueError(f"indices and scores must both be [B, E, K], got {tuple(indices.shape)} and "
                         f"{tuple(scores.shape)}")
    check_positive_int("seq_len", seq_len)
    check_positive_int("max_pairs", max_pairs)
    batch, num_heads, _ = indices.shape
    device = indices.device
    taken = (scores > 0).float()
    real = (torch.ones(batch, seq_len, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.bool())
    num_taken, num_real = taken.sum().clamp(min=1), real.sum().clamp(min=1)
    scores = scores.float()

    score_mean = (scores * taken).sum() / num_taken
    score_std = (((scores - score_mean) ** 2 * taken).sum() / num_taken).sqrt()
    heads_of_token = torch.zeros(batch, seq_len, device=device).scatter_add_(1, indices.flatten(1), taken.flatten(1))
    first = first_real_position(attention_mask, batch, device).view(batch, 1, 1)
    health = {
        "score_mean": score_mean,
        "score_std": score_std,
        "unchosen_frac": ((heads_of_token == 0) & real).sum() / num_real,
        "heads_per_token": (heads_of_token * real).sum() / num_real,
        "first_token_share": (taken * (indices == first)).sum() / num_taken,
        "tail_share": (taken * (indices >= seq_len - tail_length(seq_len))).sum() / num_taken,
    }
    if num_heads > 1:
        health["jaccard"] = mean_pairwise_jaccard(indices, taken, seq_len, head_pairs(num_heads, max_pairs))
    if join_target is not None:
        health["join_rate"] = taken.sum() / (num_real * num_heads)
        health["join_target"] = torch.tensor(float(join_target), device=device)
    return {name: value.float() for name, value in health.items()}


def mean_pairwise_jaccard(indices: torch.Tensor, taken: torch.Tensor, seq_len: int, pairs: torch.Tensor):
    """|A n B| / |A u B| of the token sets of head pairs [P, 2], averaged over pairs and sequences where the union
    is not empty. Only the paired heads' membership rows [B, 2P, T] are built, not all E."""
    batch = indices.shape[0]
    heads = pairs.to(indices.device).flatten()
    member = torch.zeros(batch, len(heads), seq_len, device=indices.device)
    # scatter_add then clamp: an empty slot may share a position with a taken one and must not erase it
    member.scatter_add_(-1, indices[:, heads], taken[:, heads]).clamp_(max=1)
    member = member.view(batch, len(pairs), 2, seq_len)
    intersection = (member[:, :, 0] * member[:, :, 1]).sum(-1)
    union = member.amax(dim=2).sum(-1)
    counted = union > 0
    return (intersection / union.clamp(min=1) * counted).sum() / counted.sum().clamp(min=1)


def record_selections(model: torch.nn.Module, enabled: bool = True) -> None:
    """Make every MoSA layer of `model` keep (or stop keeping) its last forward's selection; stopping also drops
    the kept ones."""
    for layer in mosa_layers(model):
        layer.record_selection = enabled
        if not enabled:
            layer.last_selection = None


def mosa_layers(model: torch.nn.Module) -> list:
    """The MoSA attention modules (with a router) of a MoSALM, in layer order."""
    return list(getattr(model, "mosa_layers", []))


def model_router_health(model: torch.nn.Module, max_pairs: int = 32) -> tuple[dict[str, float], dict[str, float]]:
    """(averaged, per_layer) from the selections the model's MoSA layers recorded in their last forward, then
    cleared (so a stale selection is never reported twice).

    averaged: {"router_<metric>": mean over the layers reporting it}; per_layer: {"router/layer<i>/<metric>"},
    i counting MoSA layers from the input. Both are empty when nothing was recorded (dense models, or recording
    off)."""
    names, values = [], []
    for number, layer in enumerate(mosa_layers(model)):
        selection, layer.last_selection = layer.last_selection, None
        if selection is None:
            continue
        join_target = selection.target_size / selection.seq_len if selection.routing == "causal" else None
        health = selection_health(selection.indices, selection.scores, selection.seq_len, selection.attention_mask,
                                  join_target, max_pairs)
        names += [(number, name) for name in health]
        values += list(health.values())
    if not values:
        return {}, {}
    numbers = torch.stack([value.to(values[0].device) for value in values]).tolist()  # the one host read
    per_layer = {f"router/layer{number}/{name}": value for (number, name), value in zip(names, numbers)}
    averaged = {}
    for name in METRICS:
        reported = [value for (_, metric), value in zip(names, numbers) if metric == name]
        if reported:
            averaged[f"router_{name}"] = sum(reported) / len(reported)
    return averaged, per_layer


@torch.no_grad()
def head_selections(model: torch.nn.Module, input_ids: torch.Tensor, routing: str = "topk") -> list:
    """One forward of input_ids [B, T] -> each MoSA layer's RecordedSelection, in layer order. Raises ValueError
    for a model without MoSA heads. The model's recording flags are left as they were."""
    layers = mosa_layers(model)
    if not layers:
        attention = getattr(getattr(model, "config", None), "attention", "?")
        raise ValueError(f"the model has no MoSA heads (attention={attention!r}): only MoSA routers (attention "
                         "'mosa' or 'pure_mosa') choose tokens to inspect")
    before = [layer.record_selection for layer in layers]
    record_selections(model)
    try:
        model(input_ids, routing=routing)
        return [layer.last_selection for layer in layers]
    finally:
        for layer, enabled in zip(layers, before):
            layer.record_selection, layer.last_selection = enabled, None


def most_picked_tokens(selection, token_labels: list[str], top: int = 5, row: int = 0) -> list[list[tuple[str, int]]]:
    """For each head, the `top` token strings it took most often in sequence `row` of a RecordedSelection, as
    (label, count), most frequent first (ties: the higher summed router score first). token_labels: one string per
    position. Counting strings, not positions, shows what a head looks for (every space, every line break)."""
    check_positive_int("top", top)
    if len(token_labels) != selection.seq_len:
        raise ValueError(f"token_labels has {len(token_labels)} entries for a selection of seq_len="
                         f"{selection.seq_len}")
    picked = []
    for positions, scores in zip(selection.indices[row].tolist(), selection.scores[row].tolist()):
        counts, weights = {}, {}
        for position, score in zip(positions, scores):
            if score > 0:
                label = token_labels[position]
                counts[label] = counts.get(label, 0) + 1
                weights[label] = weights.get(label, 0.0) + score
        ranked = sorted(counts, key=lambda label: (-counts[label], -weights[label]))
        picked.append([(label, counts[label]) for label in ranked[:top]])
    return picked
