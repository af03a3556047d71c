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

from runtime.errors import PromoeError, UsageError
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
    """The records of the trace file at ``path``; a :class:`TraceError` naming the line for bad data.

    The format carries no expert count, so an expert id is checked only for being a
    non-negative integer, listed once in its record.
    """
    p = Path(path)
    if p.is_dir():
        raise TraceError(
            f"{p} is a folder, not a trace file", hint="give the path of a .jsonl trace file in it"
        )
    if not p.is_file():
        raise TraceError(
            f"trace file {p} not found", hint="record one with --trace-out FILE on chat or bench"
        )
    out: list[TraceRecord] = []
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                d = json.loads(line)
                rec = TraceRecord(int(d["token"]), int(d["layer"]), tuple(int(e) for e in d["experts"]),
                                  tuple(float(w) for w in d.get("weights", [])))  # fmt: skip
            except (ValueError, KeyError, TypeError, OverflowError) as exc:  # 1e999: int(inf)
                raise TraceError(
                    f"{p}:{n}: not a trace record ({exc.__class__.__name__}: {exc})",
                    hint='each line must look like {"token": 0, "layer": 0, "experts": [6, 5], "weights": [0.7, 0.3]}',
                ) from None
            problem = _check_record(d, rec)
            if problem:
                raise TraceError(
                    f"{p}:{n}: {problem}",
                    hint="experts are the distinct ids (0, 1, ...) a token was routed to in that layer",
                )
            out.append(rec)
    if not out:
        raise TraceError(f"trace file {p} is empty")
    return out


def _check_record(d: dict, rec: TraceRecord) -> str:
    """What is wrong with a parsed record (``d`` as read, ``rec`` converted), or ""."""
    for key in ("token", "layer"):
        if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 0:
            return f"{key} {json.dumps(d[key])} is not a non-negative integer"
    if not rec.experts:
        return "no experts listed"
    for e in d["experts"]:
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            return f"expert id {json.dumps(e)} is not a non-negative integer"
    twice = next((e for i, e in enumerate(rec.experts) if e in rec.experts[:i]), None)
    if twice is not None:
        return f"expert {twice} is listed twice in {list(rec.experts)}"
    if rec.weights and len(rec.weights) != len(rec.experts):
        return f"{len(rec.weights)} weights for {len(rec.experts)} experts"
    return ""


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
    """Replay ``records`` through a data-less :class:`ExpertCache` (see module doc).

    Every expert of a record is pinned while the record runs, so a layer needs at least
    as many slots as the most experts a record lists (the trace's top-k).
    """
    top_k = max((len(r.experts) for r in records), default=1)
    if slots_per_layer < top_k:
        raise UsageError(
            f"--slots-per-layer {slots_per_layer} is too few: the trace routes each token to top-k = {top_k} "
            f"experts per layer, so at least {top_k} slots per layer are needed",
            hint=f"use --slots-per-layer {top_k} or more",
        )
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
