"""Predict the experts of the next MoE layers and copy them before they are needed.

* ``cross-layer`` (Fate, arXiv 2502.12224): layer i+d's own router applied to layer i's
  router input. Consecutive layers' hidden states are close (residual stream), so the
  next router mostly picks the same experts from either: ~97% on Mixtral, no training.
  ``extra`` adds more candidates than top-k to raise recall at the cost of bytes.
* ``learned`` (ProMoE, arXiv 2410.22134): small per-layer predictors trained on the
  user's own prompts (:mod:`runtime.predictor`), looking several layers ahead so copies
  have more compute to hide behind.
* ``none``: reactive caching only.

The :class:`Prefetcher` runs at the start of each MoE layer invocation, after the cache
pinned that layer's experts: it scores the prediction made earlier for this layer
(precision/recall), asks the predictor about the next layers, and asks the cache to
prefetch, nearest layer first. The cache drops prefetches that turned stale before
their copy started (see :mod:`runtime.expert_cache`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from runtime.errors import UnknownNameError
from runtime.expert_cache import ExpertCache

PREDICTORS = ("none", "cross-layer", "learned")


class Predictor(ABC):
    name: str

    @abstractmethod
    def predict(self, layer: int, hidden: torch.Tensor) -> list[tuple[int, list[int]]]:
        """From layer ``layer``'s router input ``[T, D]``: ``[(target_layer, experts best first)]``."""


def rank_experts(indices: torch.Tensor, scores: torch.Tensor | None, num_experts: int) -> list[int]:
    """Experts chosen for any token, most-chosen first (ties: higher total score)."""
    if indices.shape[0] == 1:  # decode: one token, distinct experts; order by score if known
        if scores is None:
            return indices[0].tolist()  # host sync: the prediction decides copies
        return indices[0][scores[0].argsort(descending=True)].tolist()
    flat = indices.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts).float()
    if scores is not None:
        counts = counts + 1e-3 * torch.zeros(num_experts, device=flat.device).index_add_(
            0, flat, scores.reshape(-1).float()
        )
    order = torch.argsort(counts, descending=True)
    n = int((counts > 0).sum())  # host sync: the prediction decides copies
    return order[:n].tolist()


class CrossLayerPredictor(Predictor):
    name = "cross-layer"

    def __init__(self, routers: dict[int, nn.Module], moe_layers: list[int], top_k: int,
                 num_experts: int, extra: int = 0, lookahead: int = 1) -> None:  # fmt: skip
        self.routers = routers
        self.moe_layers = moe_layers
        self._pos = {layer: i for i, layer in enumerate(moe_layers)}
        self.top_k = top_k
        self.num_experts = num_experts
        self.extra = extra
        self.lookahead = lookahead

    def predict(self, layer, hidden):
        pos = self._pos[layer]
        out = []
        for d in range(1, self.lookahead + 1):
            if pos + d >= len(self.moe_layers):
                break
            target = self.moe_layers[pos + d]
            logits, scores, indices = self.routers[target](hidden)
            if self.extra:
                k = min(self.top_k + self.extra, self.num_experts)
                wide = logits.reshape(-1, logits.shape[-1]).topk(k, dim=-1).indices
                ranked = rank_experts(indices, scores, self.num_experts)
                ranked += [e for e in rank_experts(wide, None, self.num_experts) if e not in ranked]
            else:
                ranked = rank_experts(indices, scores, self.num_experts)
            out.append((target, ranked))
        return out


class Prefetcher:
    """Runs a predictor at each MoE layer and issues prefetches (see module doc)."""

    def __init__(self, predictor: Predictor, cache: ExpertCache, max_per_layer: int | None = None) -> None:
        self.predictor = predictor
        self.cache = cache
        self.max_per_layer = max_per_layer
        self._pending: dict[int, set[int]] = {}

    def on_layer(self, layer: int, needed: list[int], hidden: torch.Tensor) -> None:
        predicted = self._pending.pop(layer, None)
        if predicted is not None:
            st = self.cache.stats.layer(layer)
            used = set(needed)
            st.pred_tp += len(predicted & used)
            st.pred_fp += len(predicted - used)
            st.pred_fn += len(used - predicted)
        with torch.no_grad():
            predictions = self.predictor.predict(layer, hidden)
        for target, ranked in predictions:
            cap = self.cache.capacity(target)
            if cap == 0:  # a layer without slots streams its experts: nothing to prefetch into
                continue
            if self.max_per_layer is not None:
                cap = min(cap, self.max_per_layer)
            chosen = ranked[:cap]
            self._pending[target] = set(chosen)
            for e in chosen:
                self.cache.prefetch(target, e)

    def reset(self) -> None:
        """Forget pending predictions (a new sequence starts)."""
        self._pending.clear()


def make_predictor(name: str, *, model: nn.Module, spec, extra: int = 0, lookahead: int = 1,
                   learned_path=None, model_ref: str = "MODEL") -> Predictor | None:  # fmt: skip
    """Build a predictor by name for a loaded model (``spec`` is its ModelSpec; ``model_ref``
    how the user named it, for hints)."""
    check_predictor(name)
    if name == "none":
        return None
    if name == "cross-layer":
        routers = {layer: spec.router(model, layer) for layer in spec.moe_layers}
        return CrossLayerPredictor(routers, spec.moe_layers, spec.top_k, spec.num_experts, extra, lookahead)
    if name == "learned":
        from runtime.predictor import load_learned_predictor

        ref = next(model.parameters())
        return load_learned_predictor(learned_path, spec, extra, device=ref.device, dtype=ref.dtype,
                                      model_ref=model_ref)  # fmt: skip
    raise AssertionError(f"predictor {name} is listed but not built")


def check_predictor(name: str) -> None:
    """``--prefetch``: one of PREDICTORS (checked also where none is built, as in place)."""
    if name not in PREDICTORS:
        raise UnknownNameError(f"unknown predictor '{name}'", hint=f"choose one of: {', '.join(PREDICTORS)}")
