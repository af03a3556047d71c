"""Expert-routing traces: record them from a run, read them, replay them through the cache.

Format (the one of ../shared/traces/), one JSON object a line, in execution order
(token-major: every MoE layer of token 0, then of token 1, ...)::

    {"token": 0, "layer": 0, "experts": [6, 5], "weights": [0.69596, 0.30404]}

``layer`` is the decoder-layer index; ``experts`` are the routed experts in the router's
order, ``weights`` their routing weights.

Replay semantics (:func:`replay`): each (token, layer) record is one invocation of that
layer's partition of the real :class:`runtime.expert_cache.ExpertCache`, with the given
number of slots per layer and no data behind it: the record's experts are pinned, each
is acquired (a hit if resident, else loaded on demand, evicting by the policy among the
unpinned), in the record's (router) order, and the hit rate is hits / uses. This
reproduces the table in ../shared/traces/README.md exactly. Belady, the offline optimum, sees the whole
trace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import PromoeError
from runtime.expert_cache import ExpertCache
from runtime.policies import Belady, EvictionPolicy, policy_class
from runtime.stats import ExpertStats


class TraceError(PromoeError):
    """A trace file is missing or malformed."""


@dataclass(frozen=True)
class TraceRecord:
    token: int
    layer: int
    experts: tuple[int, ...]
    weights: tuple[float, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "token": self.token,
                "layer": self.layer,
                "experts": list(self.experts),
                "weights": [round(w, 5) for w in self.weights],
            }  # fmt: skip
        )


def read_trace(path: str | Path) -> list[TraceRecord]:
    p = Path(path)
    if not p.is_file():
        raise TraceError(
            f"trace file {p} not found", hint="record one with --trace-out FILE on chat or bench"
        )
    out: list[TraceRecord] = []
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rec = TraceRecord(int(d["token"]), int(d["layer"]), tuple(int(e) for e in d["experts"]),
                                  tuple(float(w) for w in d.get("weights", [])))  # fmt: skip
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(
                    f"{p}:{n}: not a trace record ({exc.__class__.__name__}: {exc})",
                    hint='each line must look like {"token": 0, "layer": 0, "experts": [6, 5], "weights": [0.7, 0.3]}',
                ) from None
            out.append(rec)
    if not out:
        raise TraceError(f"trace file {p} is empty")
    return out


class TraceWriter:
    """Appends records as they happen; ``close`` flushes. Used by ``--trace-out``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("w")

    def write(self, records: Iterable[TraceRecord]) -> None:
        for r in records:
            self._f.write(r.to_json() + "\n")

    def close(self) -> None:
        self._f.close()


@dataclass
class ReplayResult:
    policy: str
    slots_per_layer: int
    stats: ExpertStats

    @property
    def hit_rate(self) -> float:
        return self.stats.total().hit_rate


def replay(records: list[TraceRecord], policy: str, slots_per_layer: int) -> ReplayResult:
    """Replay ``records`` through a data-less :class:`ExpertCache` (see module doc)."""
    layers = sorted({r.layer for r in records})
    if policy == "belady":
        futures: dict[int, list[tuple[int, ...]]] = {layer: [] for layer in layers}
        for r in records:
            futures[r.layer].append(r.experts)

        def factory(layer: int, capacity: int) -> EvictionPolicy:
            return Belady(capacity, futures[layer])
    else:
        cls = policy_class(policy)

        def factory(layer: int, capacity: int) -> EvictionPolicy:
            return cls(capacity)

    cache = ExpertCache({layer: slots_per_layer for layer in layers}, factory, expert_bytes=0)
    for r in records:
        for e in cache.begin(r.layer, r.experts, reorder=False):
            cache.acquire(r.layer, e)
            cache.release(r.layer, e)
        cache.end(r.layer)
    return ReplayResult(policy, slots_per_layer, cache.stats)
