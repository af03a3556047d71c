"""Smarter misses: what to do with an expert that is not resident when compute needs it.

Per miss, a cost model picks one of these routes (``route``):

* ``host`` (Fiddler, arXiv 2402.07033; kTransformers): when copying the expert would take
  longer than computing it on the host for the tokens at hand, compute it there from the
  host store and move only the activations. Exact: the same stored weights.
* ``low-bit`` (HOBBIT, arXiv 2411.01433; Fate's low-bit cold copies): when the expert's
  gate weight is below a threshold, copy a low-bit version of it (a fraction of the
  bytes) into a scratch buffer and compute from that. Nothing is cached: a later use
  still loads the full expert. The output changes, boundedly (``promoe bench --quality``).
* ``copy``: the cache's normal on-demand load.
* ``stream``: the same, for a layer that has no slot (a budget smaller than one expert
  per layer, :mod:`runtime.memory_plan`): the expert is copied into the stream buffer,
  used, and forgotten.

Host wins over low-bit when both apply, since it is exact. The cost model's figures
come from the link (emulated, or one copy timed at load on CUDA) and from timing one
expert on the host at load (:func:`calibrate`).

An invocation's misses are routed together (:meth:`MissHandler.routes`). Beside a GPU the
host and the link work at the same time, so each miss goes to whichever would finish it
first given the misses already given to each: two misses that each take the host 7 ms
and the link 8 ms go one to each (8 ms), not both to the host (14 ms). The caller takes
the host's inputs first, then issues the link's copies and the device's kernels before
the host computes (:mod:`runtime.offload`), so the three do work at once. When the CPU is
the device it also computes what the link brings, so there each miss is weighed alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quant import QuantFormat
from runtime.expert_cache import ExpertCache
from runtime.expert_layout import ExpertLayout
from runtime.expert_store import ExpertStore

ROUTES = ("copy", "low-bit", "host", "stream")


@dataclass
class CostModel:
    link_bandwidth: float  # bytes per second, host -> device
    link_latency: float  # seconds per copy
    host_fixed_s: float  # one expert on the host: fixed cost ...
    host_per_token_s: float  # ... plus this per token

    def copy_s(self, nbytes: int) -> float:
        return self.link_latency + nbytes / self.link_bandwidth

    def host_s(self, tokens: int) -> float:
        return self.host_fixed_s + tokens * self.host_per_token_s


class MissHandler:
    """Routes misses (see module doc) and computes the ``host`` and ``low-bit`` ones."""

    def __init__(
        self,
        cache: ExpertCache,
        store: ExpertStore,
        fmt: QuantFormat,
        cost: CostModel | None,  # needed with ``host`` only
        *,
        host: bool = False,
        low_store: ExpertStore | None = None,
        low_fmt: QuantFormat | None = None,
        threshold: float = 0.3,
    ) -> None:
        self.cache, self.store, self.fmt, self.cost = cache, store, fmt, cost
        self.host = host
        self.low_store, self.low_fmt, self.threshold = low_store, low_fmt, threshold
        # one buffer outside the slots: a whole expert if a layer streams, else a low-bit copy
        streams = any(n == 0 for n in cache.slots_per_layer().values())
        size = store.layout.nbytes if streams else low_store.layout.nbytes if low_store is not None else 0
        self._scratch = torch.empty(size, dtype=torch.uint8, device=cache.device) if size else None

    def routes(self, layer: int, misses: list[tuple[int, int, torch.Tensor]]) -> dict[int, str]:
        """A route for each of an invocation's misses, ``(expert, tokens, gate weights)``, in
        order (see module doc)."""
        link = "stream" if self.cache.capacity(layer) == 0 else "copy"
        together = self.host and self.cache.device.type != "cpu"  # host and device compute apart
        host_busy = link_busy = 0.0  # seconds of work given to each so far
        out = {}
        for expert, tokens, weights in misses:
            if self.host:
                host_done = host_busy + self.cost.host_s(tokens)
                if host_done < link_busy + self.cost.copy_s(self.store.layout.nbytes):  # exact, and sooner
                    out[expert] = "host"
                    host_busy = host_done if together else 0.0
                    continue
            # host sync, on a miss only
            low = self.low_store is not None and float(weights.max()) < self.threshold
            out[expert] = "low-bit" if low else link
            if together:
                link_busy += self.cost.copy_s((self.low_store if low else self.store).layout.nbytes)
        return out

    def compute_on_host(self, layer: int, expert: int, xh: torch.Tensor, gate_fn: Callable) -> torch.Tensor:
        """The ``host`` route: ``expert`` on ``xh`` (the activations, already on the host in
        float32), from the host store; the result stays on the host."""
        from runtime.offload import expert_mlp

        y = expert_mlp(xh, self.store.weights(layer, expert), self.fmt, self.store.layout, gate_fn)
        self.cache.record_bypass(layer, expert, "host", nbytes=0, stall_s=0.0)
        return y

    def compute(
        self, route: str, layer: int, expert: int, x: torch.Tensor, gate_fn: Callable
    ) -> torch.Tensor:
        """The ``low-bit`` and ``stream`` routes: a copy into the buffer outside the slots."""
        from runtime.offload import expert_mlp

        store, fmt = (self.store, self.fmt) if route == "stream" else (self.low_store, self.low_fmt)
        row = store.row(layer, expert)
        buf = self._scratch[: row.numel()]
        stall = self.cache.transfer.copy_now(row, buf, layer)
        self.cache.record_bypass(layer, expert, route, nbytes=row.numel(), stall_s=stall)
        return expert_mlp(x, store.layout.views(buf), fmt, store.layout, gate_fn)


def _median_time(fn: Callable[[], object], sync: Callable[[], None], n: int = 15) -> float:
    times = []
    for i in range(n + 3):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(
    store: ExpertStore,
    fmt: QuantFormat,
    device: torch.device,
    link: tuple[float | None, float],
    gate_fn: Callable,
) -> CostModel:
    """Time one expert on the host (1 and 16 tokens) and, on CUDA, one real copy of a row."""
    from runtime.offload import expert_mlp

    layer = store.layers[0]
    layout: ExpertLayout = store.layout
    w = store.weights(layer, 0)
    none = lambda: None  # noqa: E731
    with torch.inference_mode():
        t1 = _median_time(
            lambda: expert_mlp(torch.randn(1, layout.shape.hidden), w, fmt, layout, gate_fn), none
        )
        t16 = _median_time(
            lambda: expert_mlp(torch.randn(16, layout.shape.hidden), w, fmt, layout, gate_fn), none
        )
    per_token = max((t16 - t1) / 15, 0.0)
    bandwidth, latency = link
    if device.type == "cuda" and bandwidth is None:
        dst = torch.empty_like(store.row(layer, 0), device=device)
        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
        copy_s = _median_time(lambda: dst.copy_(store.row(layer, 0), non_blocking=True), sync, n=5)
        bandwidth, latency = layout.nbytes / copy_s, 0.0
    elif bandwidth is None:  # the CPU without an emulated link: a memcpy
        dst = torch.empty_like(store.row(layer, 0))
        copy_s = _median_time(lambda: dst.copy_(store.row(layer, 0)), none, n=5)
        bandwidth = layout.nbytes / copy_s
    return CostModel(bandwidth, latency, max(t1 - per_token, 0.0), per_token)
