"""Exact counters of what the expert cache and the prefetcher did, per layer and in total.

Definitions (every figure promoe prints uses these):

* a *use* is one expert computed in one invocation of a layer (a decode token, or a
  prefill chunk, where one expert may serve many tokens);
* a *hit* is a use whose expert was resident with its copy complete when compute asked
  for it ("hit rate at the moment of use"); a *late* use found its prefetch still in
  flight and waited for it; a *miss* had to be loaded on demand. ``uses = hits + late +
  misses``;
* ``bytes_moved`` counts host-to-device expert bytes actually copied (prefetches that
  were cancelled before they started move nothing);
* prediction precision / recall compare the experts a predictor named for a layer with
  the experts that layer then used: ``tp / (tp + fp)`` and ``tp / (tp + fn)``;
* a *wasted* prefetch was copied and then evicted (or superseded) before any use;
* ``stall_s`` is time the compute path spent waiting for expert copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class LayerCounters:
    uses: int = 0
    hits: int = 0
    late: int = 0
    misses: int = 0
    bytes_moved: int = 0
    prefetches: int = 0  # copies issued by the prefetcher
    prefetch_used: int = 0  # of those, used before eviction
    prefetch_wasted: int = 0  # copied, then evicted unused
    prefetch_cancelled: int = 0  # dropped before the copy started
    wasted_bytes: int = 0
    pred_tp: int = 0
    pred_fp: int = 0
    pred_fn: int = 0
    cpu_computed: int = 0  # misses computed on the host instead of copied
    low_bit_loads: int = 0  # misses served by a low-bit copy
    stall_s: float = 0.0

    def add(self, other: LayerCounters) -> None:
        for name in _NAMES:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def since(self, earlier: LayerCounters) -> LayerCounters:
        """What was counted after ``earlier`` (these counters, taken before)."""
        return LayerCounters(**{name: getattr(self, name) - getattr(earlier, name) for name in _NAMES})

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    @property
    def prediction_precision(self) -> float | None:
        n = self.pred_tp + self.pred_fp
        return self.pred_tp / n if n else None

    @property
    def prediction_recall(self) -> float | None:
        n = self.pred_tp + self.pred_fn
        return self.pred_tp / n if n else None


@dataclass
class ExpertStats:
    layers: dict[int, LayerCounters] = field(default_factory=dict)

    def layer(self, layer: int) -> LayerCounters:
        c = self.layers.get(layer)
        if c is None:
            c = self.layers[layer] = LayerCounters()
        return c

    def total(self) -> LayerCounters:
        t = LayerCounters()
        for c in self.layers.values():
            t.add(c)
        return t

    def reset(self) -> None:
        self.layers.clear()


_NAMES = tuple(f.name for f in fields(LayerCounters))  # read once: fields() is slow, this runs per token
