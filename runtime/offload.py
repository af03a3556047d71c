"""The offloaded-experts module that replaces each transformers ``mlp.experts``.

:class:`OffloadedExperts` has the same ``forward(hidden_states, top_k_index,
top_k_weights)`` as the module it replaces, so the model's own router (and shared
experts, dense layers, routing quirks) stay exactly transformers' code; only where the
expert weights come from changes: a device slot of the :class:`ExpertCache`, quantized,
dequantized on use by the store's format.
"""

# Shape key: T = tokens in this invocation, K = experts per token (top-k),
#            D = hidden size, I = expert intermediate size, E = experts in the layer

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quant import QuantFormat
from runtime.expert_cache import ExpertCache
from runtime.expert_layout import ExpertLayout, ExpertWeights
from runtime.trace import TraceRecord


class RoutingTracer:
    """Collects routing per invocation; :meth:`flush` turns one forward into token-major records."""

    def __init__(self) -> None:
        self._step: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def record(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        self._step.append((layer, top_k_index.detach().cpu(), top_k_weights.detach().float().cpu()))

    def take(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The invocations recorded since the last take/flush: ``(layer, indices [T, K], weights [T, K])``."""
        step, self._step = self._step, []
        return step

    def flush(self, first_token: int) -> list[TraceRecord]:
        """Token-major trace records of the forward just run (tokens numbered from ``first_token``)."""
        step = self.take()
        if not step:
            return []
        n_tokens = step[0][1].shape[0]
        return [
            TraceRecord(first_token + t, layer, tuple(idx[t].tolist()), tuple(w[t].tolist()))
            for t in range(n_tokens)
            for layer, idx, w in step
        ]

    def discard(self) -> None:
        self._step.clear()


@dataclass
class OffloadRuntime:
    """What every OffloadedExperts of one model shares."""

    cache: ExpertCache
    layout: ExpertLayout
    fmt: QuantFormat
    prefetcher: object | None = None  # runtime.prefetch.Prefetcher
    tracer: RoutingTracer | None = None
    miss_handler: object | None = None  # runtime.miss.MissHandler: low-bit copies, host compute
    hooks: list[Callable[[int, torch.Tensor], None]] = field(default_factory=list)  # (layer, router input)


def expert_mlp(
    x: torch.Tensor, w: ExpertWeights, fmt: QuantFormat, layout: ExpertLayout, gate_fn: Callable
) -> torch.Tensor:
    """One expert on ``x [T, D]``: ``down(gate_fn(gate_up(x)))``, dequantizing on the fly."""
    mats = layout.shape.matrices()
    b1 = w.gate_up_bias.to(x.dtype) if w.gate_up_bias is not None else None
    b2 = w.down_bias.to(x.dtype) if w.down_bias is not None else None
    h = fmt.linear(x, w.gate_up, mats["gate_up"], b1)  # [T, 2I]
    h = gate_fn(h)  # [T, I]
    return fmt.linear(h, w.down, mats["down"], b2)  # [T, D]


class OffloadedExperts(nn.Module):
    """Drop-in for a transformers experts module, served from the device expert cache."""

    def __init__(self, layer: int, original: nn.Module, rt: OffloadRuntime) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = int(original.num_experts)
        # the original (on the meta device, no memory) keeps its activation: transformers
        # stays the single source of truth for gate/up splitting, clamping, interleaving
        self._gate_fn = original._apply_gate
        self.rt = rt

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, quant={self.rt.fmt.name}"

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        rt, cache, layer = self.rt, self.rt.cache, self.layer
        T, K = top_k_index.shape
        flat = top_k_index.reshape(-1)  # [T*K]
        # host sync: which experts to fetch is a host decision (one per layer invocation)
        if T == 1:
            needed = flat.tolist()  # top-k experts are distinct
            counts = None
        else:
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
            needed = [e for e, c in enumerate(counts) if c]
        if rt.tracer is not None:
            rt.tracer.record(layer, top_k_index, top_k_weights)
        order = cache.begin(layer, needed)
        try:
            for hook in rt.hooks:
                hook(layer, hidden_states)
            if rt.prefetcher is not None:
                rt.prefetcher.on_layer(layer, needed, hidden_states)
            return self._compute(hidden_states, needed, flat, top_k_weights, counts, order, K)
        finally:
            cache.end(layer)

    def _compute(self, x, needed, flat, top_k_weights, counts, order, K):
        out = torch.zeros_like(x)  # [T, D]
        if counts is None:  # decode: one token, no gather/scatter needed
            slot_of = {e: k for k, e in enumerate(needed)}
            parts = {e: (None, top_k_weights[:, slot_of[e], None]) for e in order}  # (tokens, w [1, 1])
        else:
            perm = flat.argsort(stable=True)  # [T*K], grouped by expert
            token_of = perm // K
            weight_of = top_k_weights.reshape(-1)[perm]
            starts = [0] * (self.num_experts + 1)
            for e, c in enumerate(counts):
                starts[e + 1] = starts[e] + c
            parts = {e: (token_of[starts[e] : starts[e + 1]], weight_of[starts[e] : starts[e + 1], None])
                     for e in order}  # (tokens [t], w [t, 1]); x[tokens] gathered when computed  # fmt: skip
        sequence, routes, on_host = self._schedule(x, order, parts)
        for e in sequence:
            tok, w = parts[e]
            if e in on_host:
                y = self._from_host(
                    self.rt.miss_handler.compute_on_host(self.layer, e, on_host[e], self._gate_fn), x
                )
            else:
                y = self._serve(e, x if tok is None else x[tok], routes.get(e, "copy"))
            if tok is None:
                out += y * w
            else:
                out.index_add_(0, tok, (y * w).to(out.dtype))
        return out

    def _schedule(self, x: torch.Tensor, order: list[int], parts: dict):
        """Route this invocation's misses (runtime.miss), copy the host's inputs to it, and
        start the copies of the misses that go into a slot. Returns the order to compute in,
        the routes (a miss without one is loaded into a slot) and the host's inputs.

        The host's inputs are copied before any of this invocation's device work is queued:
        that copy waits for everything queued before it. Beside a GPU the host's misses then
        come last, once the device's kernels and the link's copies are all issued, so the
        three work at once; on the CPU, which computes all of them, the host's misses come
        before the copied ones, whose copies they hide."""
        rt, cache, layer = self.rt, self.rt.cache, self.layer
        misses = [e for e in order if not cache.is_resident(layer, e)]
        routes: dict[int, str] = {}
        if rt.miss_handler is not None and misses:
            sizes = [(e, 1 if parts[e][0] is None else parts[e][0].numel(), parts[e][1]) for e in misses]
            routes = rt.miss_handler.routes(layer, sizes)
        on_host = {e: (x if parts[e][0] is None else x[parts[e][0]]).to("cpu", torch.float32)
                   for e in misses if routes.get(e) == "host"}  # fmt: skip
        for e in misses:
            if routes.get(e, "copy") == "copy":
                cache.load_ahead(layer, e)
        device_side = [e for e in order if e not in on_host]
        if cache.device.type == "cpu":
            resident = [e for e in order if e not in misses]
            return resident + list(on_host) + [e for e in device_side if e in misses], routes, on_host
        return device_side + list(on_host), routes, on_host

    def _from_host(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A host result back on the device: through pinned memory beside a GPU, so the copy
        queues behind the device's work instead of waiting for it."""
        if like.device.type == "cuda":
            y = y.pin_memory()
        return y.to(like.device, like.dtype, non_blocking=like.device.type == "cuda")

    def _serve(self, e: int, x: torch.Tensor, route: str) -> torch.Tensor:
        """Expert ``e`` on ``x [t, D]``: from its cache slot, or by the miss handler's ``route``
        (low-bit or stream; the host's misses go through :meth:`_schedule`)."""
        rt, cache, layer = self.rt, self.rt.cache, self.layer
        if route != "copy":
            return rt.miss_handler.compute(route, layer, e, x, self._gate_fn)
        w = cache.acquire(layer, e)
        try:
            return expert_mlp(x, w, rt.fmt, rt.layout, self._gate_fn)
        finally:
            cache.release(layer, e)
