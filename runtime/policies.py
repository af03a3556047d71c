"""Eviction policies for one layer's share of the expert cache.

The cache owns the slots and decides *when* to evict (a miss or a prefetch needs room);
a policy only decides *which* resident expert goes, from the candidates the cache allows
(never a pinned expert, i.e. one the current forward still needs, nor one whose copy is
in flight). Each MoE layer has its own policy instance over its own slots, as in
mixtral-offloading and the papers in DESIGN.md.

Call order, per invocation of a layer (one decode token, or one prefill chunk):
``tick()``, then per expert used ``on_access(e, hit)`` (after ``on_insert(e)`` when it
had to be loaded); ``on_insert`` also follows a prefetch; ``on_evict`` follows eviction.

* LRU: evict the least recently used (or inserted) expert.
* LFU: evict the least frequently used; counts every past use of an expert, resident or
  not, and breaks ties by least recent use (as in arXiv 2511.05814's analysis, where LFU
  beats LRU on Mixtral traces).
* ARC: Megiddo & Modha's adaptive replacement cache (used by Fate, arXiv 2502.12224):
  recency list T1 and frequency list T2 with ghost lists B1/B2 steering the target size
  of T1.
* Belady: the offline optimum (evict the expert used farthest in the future); needs the
  whole future, so only trace replay can use it, as the bound for the others.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import ClassVar

from runtime.errors import UnknownNameError


class EvictionPolicy(ABC):
    name: ClassVar[str]

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def tick(self) -> None:
        """A new invocation of this layer starts."""

    def on_access(self, expert: int, hit: bool) -> None:
        """Compute used ``expert``; ``hit`` says whether it was resident and ready."""

    def on_insert(self, expert: int) -> None:
        """``expert`` was loaded into a slot (on demand or by prefetch)."""

    def on_evict(self, expert: int) -> None:
        """``expert`` left its slot."""

    @abstractmethod
    def victim(self, candidates: Sequence[int], incoming: int) -> int:
        """Which of ``candidates`` (resident, evictable) to evict to make room for ``incoming``."""


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._clock = 0
        self._last: dict[int, int] = {}

    def _touch(self, expert: int) -> None:
        self._clock += 1
        self._last[expert] = self._clock

    def on_access(self, expert: int, hit: bool) -> None:
        self._touch(expert)

    def on_insert(self, expert: int) -> None:
        self._touch(expert)

    def on_evict(self, expert: int) -> None:
        self._last.pop(expert, None)

    def victim(self, candidates: Sequence[int], incoming: int) -> int:
        return min(candidates, key=lambda e: self._last.get(e, 0))


class LFU(EvictionPolicy):
    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._clock = 0
        self._count: dict[int, int] = {}  # every past use, resident or not
        self._last: dict[int, int] = {}

    def on_access(self, expert: int, hit: bool) -> None:
        self._clock += 1
        self._count[expert] = self._count.get(expert, 0) + 1
        self._last[expert] = self._clock

    def victim(self, candidates: Sequence[int], incoming: int) -> int:
        return min(candidates, key=lambda e: (self._count.get(e, 0), self._last.get(e, 0)))


class ARC(EvictionPolicy):
    """Adaptive Replacement Cache over one layer's slots (Megiddo & Modha, FAST 2003)."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.p = 0.0  # target size of T1
        self.t1: OrderedDict[int, None] = OrderedDict()  # resident, seen once (LRU first)
        self.t2: OrderedDict[int, None] = OrderedDict()  # resident, seen twice or more
        self.b1: OrderedDict[int, None] = OrderedDict()  # ghosts evicted from T1
        self.b2: OrderedDict[int, None] = OrderedDict()  # ghosts evicted from T2

    def on_access(self, expert: int, hit: bool) -> None:
        if hit and (expert in self.t1 or expert in self.t2):
            self.t1.pop(expert, None)
            self.t2.pop(expert, None)
            self.t2[expert] = None

    def victim(self, candidates: Sequence[int], incoming: int) -> int:
        c = self.capacity
        if incoming in self.b1:  # recency would have helped: grow T1's target
            self.p = min(c, self.p + max(len(self.b2) / max(len(self.b1), 1), 1.0))
        elif incoming in self.b2:  # frequency would have helped: shrink it
            self.p = max(0.0, self.p - max(len(self.b1) / max(len(self.b2), 1), 1.0))
        allowed = set(candidates)
        in_t1 = [e for e in self.t1 if e in allowed]
        in_t2 = [e for e in self.t2 if e in allowed]
        from_t1 = bool(in_t1) and (len(self.t1) > self.p or (incoming in self.b2 and len(self.t1) == self.p))
        if from_t1 or not in_t2:
            return in_t1[0] if in_t1 else candidates[0]
        return in_t2[0]

    def on_insert(self, expert: int) -> None:
        if expert in self.b1 or expert in self.b2:
            self.b1.pop(expert, None)
            self.b2.pop(expert, None)
            self.t2[expert] = None
        else:
            self.t1[expert] = None
        c = self.capacity
        while len(self.t1) + len(self.b1) > c and self.b1:
            self.b1.popitem(last=False)
        while len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * c and self.b2:
            self.b2.popitem(last=False)

    def on_evict(self, expert: int) -> None:
        if expert in self.t1:
            del self.t1[expert]
            self.b1[expert] = None
        elif expert in self.t2:
            del self.t2[expert]
            self.b2[expert] = None


class Belady(EvictionPolicy):
    """Offline optimum: evict the candidate whose next use is farthest away (or never)."""

    name = "belady"

    def __init__(self, capacity: int, future: Sequence[Collection[int]]) -> None:
        super().__init__(capacity)
        self._pos = -1
        self._uses: dict[int, list[int]] = {}
        for i, experts in enumerate(future):
            for e in experts:
                self._uses.setdefault(e, []).append(i)

    def tick(self) -> None:
        self._pos += 1

    def _next_use(self, expert: int) -> float:
        uses = self._uses.get(expert, [])
        i = bisect.bisect_right(uses, self._pos)
        return uses[i] if i < len(uses) else float("inf")

    def victim(self, candidates: Sequence[int], incoming: int) -> int:
        return max(candidates, key=self._next_use)


ONLINE_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "lfu": LFU, "arc": ARC}


def policy_class(name: str) -> type[EvictionPolicy]:
    try:
        return ONLINE_POLICIES[name]
    except KeyError:
        hint = f"choose one of: {', '.join(ONLINE_POLICIES)}"
        if name == "belady":
            hint = "belady needs the future, so only trace replay has it: promoe bench --trace FILE"
        raise UnknownNameError(f"unknown cache policy '{name}'", hint=hint) from None
