"""The device expert cache: fixed-size slots inside a byte budget, split per MoE layer.

Every slot holds one expert's byte row (see :mod:`runtime.expert_layout`), so a swap is
one copy and a slot's typed views are built once. Each MoE layer owns a partition of the
slots (uniform, or shallow-favoring as in Fate) and its own eviction policy
(:mod:`runtime.policies`). The same class runs without data (``store=None``): trace
replay drives exactly this code, only nothing is copied.

One invocation of a layer (a decode token, or a prefill chunk) goes::

    order = cache.begin(layer, needed)     # pins `needed`, drops stale queued prefetches,
    for e in order:                        #   returns ready experts first (ProMoE's
        w = cache.acquire(layer, e)        #   reordered inference)
        ... compute with w ...             # hit, late prefetch (wait), or on-demand miss
        cache.release(layer, e)
    cache.end(layer)                       # unpins; on-demand mode forgets everything

A layer may have no slot (a budget smaller than one expert per layer, see
:mod:`runtime.memory_plan`): nothing is ever resident or prefetched there, and the miss
handler serves each of its uses from a stream buffer (:mod:`runtime.miss`) instead of
``acquire``.

Slot rules, enforced here on the main thread (stream rules are in the engines):

* a pinned expert (needed by the invocation in progress) is never evicted, unless the
  partition is smaller than the invocation's working set, and then only experts the
  invocation has already computed;
* an expert whose copy is in flight is never chosen as a victim; if it must make room
  for an on-demand load, a queued copy is cancelled, a running one is waited for;
* a prefetch never evicts a pinned expert nor another prefetch made for the same
  upcoming invocation (``protected``), and is skipped if no slot is free of both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from runtime.expert_layout import ExpertLayout, ExpertWeights
from runtime.expert_store import ExpertStore
from runtime.policies import EvictionPolicy
from runtime.stats import ExpertStats
from runtime.transfer import CANCELLED, InlineCopy, Ticket, TransferEngine

PolicyFactory = Callable[[int, int], EvictionPolicy]  # (layer, capacity) -> policy


class _Entry:
    __slots__ = ("expert", "slot", "ticket", "prefetched", "protected", "ahead")

    def __init__(
        self, expert: int, slot: int, ticket: Ticket | None, prefetched: bool, ahead: bool = False
    ) -> None:
        self.expert = expert
        self.slot = slot
        self.ticket = ticket  # copy in flight (None once known complete)
        self.prefetched = prefetched  # loaded by prefetch, not used yet
        self.protected = prefetched  # prefetched for the next invocation of its layer
        self.ahead = ahead  # a miss of the invocation in progress, copied before compute asked (load_ahead)


class _Partition:
    def __init__(self, layer: int, slots: list[int], policy: EvictionPolicy) -> None:
        self.layer = layer
        self.capacity = len(slots)
        self.slots = tuple(slots)
        self.free = list(reversed(slots))
        self.entries: dict[int, _Entry] = {}
        self.policy = policy
        self.pinned: set[int] = set()
        self.done: set[int] = set()


class ExpertCache:
    def __init__(
        self,
        slots_per_layer: dict[int, int],
        policy: PolicyFactory,
        *,
        store: ExpertStore | None = None,
        device: torch.device | str = "cpu",
        transfer: TransferEngine | None = None,
        stats: ExpertStats | None = None,
        retain: bool = True,
        expert_bytes: int | None = None,
        in_place: bool = False,
    ) -> None:
        if any(n < 0 for n in slots_per_layer.values()):
            raise ValueError("slot counts must be 0 or more")
        self.store = store
        self.layout: ExpertLayout | None = store.layout if store is not None else None
        self.expert_bytes = self.layout.nbytes if self.layout else (expert_bytes or 0)
        self.device = torch.device(device)
        self.transfer = transfer or InlineCopy()
        self.stats = stats or ExpertStats()
        self.retain = retain
        self._parts: dict[int, _Partition] = {}
        start = 0
        for layer, n in slots_per_layer.items():
            self._parts[layer] = _Partition(layer, list(range(start, start + n)), policy(layer, n))
            start += n
        self.num_slots = start
        self.slots: torch.Tensor | None = None
        self._views: list[ExpertWeights] = []
        # in place: the device is the host and every expert fits, so compute reads the store's
        # own rows and nothing is ever copied (a copy would double the experts' memory)
        self.in_place: dict[int, list[ExpertWeights]] | None = None
        if in_place:
            if store is None or self.device.type != "cpu":
                raise ValueError("in-place experts need a host store and the CPU as the device")
            self.in_place = {}
            for layer, part in self._parts.items():
                n = store.rows(layer).shape[0]
                if part.capacity < n:
                    raise ValueError(f"in-place experts need a slot for each of layer {layer}'s {n} experts")
                self.in_place[layer] = [self.layout.views(store.row(layer, e)) for e in range(n)]
                for e in range(n):
                    part.entries[e] = _Entry(e, part.free.pop(), None, prefetched=False)
                    part.policy.on_insert(e)
        elif self.layout is not None:
            # T = slots, B = bytes per expert row
            self.slots = torch.empty(
                (start, self.layout.nbytes), dtype=torch.uint8, device=self.device
            )  # [T, B]
            self._views = [self.layout.views(self.slots[i]) for i in range(start)]

    # -- queries ----------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Device bytes of the slots (none when the experts are read in place)."""
        return 0 if self.in_place is not None else self.num_slots * self.expert_bytes

    def capacity(self, layer: int) -> int:
        return self._parts[layer].capacity

    def slots_per_layer(self) -> dict[int, int]:
        return {layer: p.capacity for layer, p in self._parts.items()}

    def resident(self, layer: int) -> list[int]:
        return sorted(self._parts[layer].entries)

    def is_resident(self, layer: int, expert: int) -> bool:
        return expert in self._parts[layer].entries

    def slot_of(self, layer: int, expert: int) -> int | None:
        entry = self._parts[layer].entries.get(expert)
        return None if entry is None else entry.slot

    def _ready(self, entry: _Entry) -> bool:
        if entry.ticket is not None and self.transfer.is_done(entry.ticket):
            entry.ticket = None
        return entry.ticket is None

    # -- one invocation of a layer ------------------------------------------------------
    def begin(self, layer: int, needed: Sequence[int], reorder: bool = True) -> list[int]:
        """Start an invocation that will use ``needed``; returns the order to compute them.

        With ``reorder`` the experts already resident come first, then those in flight,
        then misses, so compute runs while the missing ones load (ProMoE's reordered
        inference); without it, ``needed``'s own order (trace replay uses router order).
        """
        part = self._parts[layer]
        part.policy.tick()
        part.pinned = set(needed)
        part.done = set()
        for e, entry in list(part.entries.items()):  # stale: queued for this layer, not needed
            stale = entry.ticket is not None and entry.prefetched and e not in part.pinned
            if stale and self.transfer.cancel(entry.ticket):
                part.free.append(self._drop(part, e, cancelled=True))
        if not reorder:
            return list(needed)
        ready, inflight, missing = [], [], []
        for e in needed:
            entry = part.entries.get(e)
            (missing if entry is None else ready if self._ready(entry) else inflight).append(e)
        for e in inflight:  # needed now: ahead of other prefetches, and of the misses' copies to come
            self.transfer.hurry(part.entries[e].ticket)
        return ready + inflight + missing

    def acquire(self, layer: int, expert: int) -> ExpertWeights | None:
        """Make ``expert`` usable by compute now; returns its slot's views (None without data)."""
        part = self._parts[layer]
        st = self.stats.layer(layer)
        st.uses += 1
        entry = part.entries.get(expert)
        hit = entry is not None and not entry.ahead and self._ready(entry)
        if hit:
            st.hits += 1
        elif entry is not None and entry.ahead:  # a miss whose copy load_ahead started
            st.misses += 1
            entry.ahead = False
            if not self._ready(entry):
                st.stall_s += self.transfer.wait(entry.ticket)
                entry.ticket = None
        elif entry is not None:  # its prefetch is still in flight
            st.late += 1
            st.stall_s += self.transfer.wait(entry.ticket)
            entry.ticket = None
        else:
            st.misses += 1
            entry = self._load(part, expert, prefetch=False)
            assert entry is not None  # an on-demand load always finds room (see _take_slot)
            if entry.ticket is not None:
                st.stall_s += self.transfer.wait(entry.ticket)
                entry.ticket = None
        if entry.prefetched:
            st.prefetch_used += 1
            entry.prefetched = False
        part.policy.on_access(expert, hit)
        part.pinned.add(expert)
        if self.in_place is not None:
            return self.in_place[layer][expert]
        return self._views[entry.slot] if self._views else None

    def record_bypass(self, layer: int, expert: int, route: str, nbytes: int, stall_s: float) -> None:
        """Count a miss that the miss handler served without a slot (``route``: host,
        low-bit, or stream: a layer without slots)."""
        st = self.stats.layer(layer)
        st.uses += 1
        st.misses += 1
        st.bytes_moved += nbytes
        st.stall_s += stall_s
        if route == "host":
            st.cpu_computed += 1
        elif route == "low-bit":
            st.low_bit_loads += 1
        self._parts[layer].policy.on_access(expert, False)

    def release(self, layer: int, expert: int) -> None:
        """Compute has issued its work on ``expert`` for this invocation."""
        part = self._parts[layer]
        part.done.add(expert)
        entry = part.entries.get(expert)
        if entry is not None:
            self.transfer.slot_released(entry.slot)

    def end(self, layer: int) -> None:
        part = self._parts[layer]
        part.pinned.clear()
        part.done.clear()
        for entry in part.entries.values():
            entry.protected = entry.ahead = False
        if not self.retain:
            for e, entry in list(part.entries.items()):
                if entry.ticket is not None and not self._ready(entry):
                    # a copy still on its way would land in the slot after its next owner's
                    if self.transfer.cancel(entry.ticket):
                        part.free.append(self._drop(part, e, cancelled=True))
                        continue
                    self.stats.layer(layer).stall_s += self.transfer.wait(entry.ticket)
                    entry.ticket = None
                part.free.append(self._drop(part, e))
        self.collect_stall()

    def collect_stall(self) -> None:
        """Count the stall measured after the fact (CUDA events that completed since the last
        call: copies on the compute stream, waits for on-demand copies)."""
        for layer_, stall in self.transfer.deferred_stall().items():
            self.stats.layer(layer_).stall_s += stall

    def load_ahead(self, layer: int, expert: int) -> bool:
        """Start the copy of ``expert``, a miss of the invocation in progress, before compute
        asks for it, so it moves while the experts ahead of it compute (on a GPU the copy
        engine overlaps them anyway; on the emulated link only this does). Only into a free
        slot, or one whose expert this invocation does not need and whose copy is complete:
        nothing is waited for or cancelled. ``acquire`` counts it as the miss it is."""
        part = self._parts[layer]
        if expert in part.entries or part.capacity == 0:
            return False
        return self._load(part, expert, prefetch=False, ahead=True) is not None

    # -- prefetch -------------------------------------------------------------------------
    def prefetch(self, layer: int, expert: int) -> bool:
        """Start copying ``expert`` for the next invocation of ``layer``. True if a copy was issued."""
        part = self._parts[layer]
        entry = part.entries.get(expert)
        if entry is not None:
            entry.protected = True
            return False
        entry = self._load(part, expert, prefetch=True)
        if entry is None:
            return False
        self.stats.layer(layer).prefetches += 1
        return True

    # -- slots ----------------------------------------------------------------------------
    def _load(self, part: _Partition, expert: int, prefetch: bool, ahead: bool = False) -> _Entry | None:
        slot = self._take_slot(part, expert, prefetch, ahead)
        if slot is None:
            return None
        ticket = None
        if self.slots is not None:
            src = self.store.row(part.layer, expert)
            ticket = self.transfer.submit(src, self.slots[slot], slot, part.layer, urgent=not prefetch)
        if self.in_place is None:
            self.stats.layer(part.layer).bytes_moved += self.expert_bytes
        entry = part.entries[expert] = _Entry(expert, slot, ticket, prefetched=prefetch, ahead=ahead)
        part.policy.on_insert(expert)
        return entry

    def _take_slot(self, part: _Partition, incoming: int, prefetch: bool, ahead: bool = False) -> int | None:
        if part.free:
            return part.free.pop()
        ents = part.entries
        cands = [
            e for e, en in ents.items()
            if e not in part.pinned and self._ready(en) and not (prefetch and en.protected)
        ]  # fmt: skip
        if not cands and (prefetch or ahead):
            return None
        if not cands:  # working set larger than the partition: reuse what this invocation finished
            cands = [e for e in part.done if e in ents and self._ready(ents[e])]
        if not cands:  # only copies in flight remain: cancel a queued one, or wait for one
            for e, en in list(ents.items()):
                if e in part.pinned:
                    continue
                if self.transfer.cancel(en.ticket):
                    return self._drop(part, e, cancelled=True)
                self.stats.layer(part.layer).stall_s += self.transfer.wait(en.ticket)
                en.ticket = None
                cands = [e]
                break
        if not cands:
            raise RuntimeError(f"layer {part.layer}: no slot can be freed (capacity {part.capacity})")
        victim = part.policy.victim(cands, incoming)
        return self._drop(part, victim)

    def _drop(self, part: _Partition, expert: int, cancelled: bool = False) -> int:
        """Forget ``expert``; returns its slot, which the caller reuses or puts back in ``free``."""
        entry = part.entries.pop(expert)
        st = self.stats.layer(part.layer)
        if cancelled:  # a queued copy that never moved (a prefetch, or a miss's load_ahead)
            st.prefetch_cancelled += entry.prefetched
            st.bytes_moved -= self.expert_bytes
        elif entry.prefetched:
            st.prefetch_wasted += 1
            st.wasted_bytes += self.expert_bytes
        part.policy.on_evict(expert)
        return entry.slot

    def fill(self) -> None:
        """Load every expert each partition has room for (all of them when the cache holds the model)."""
        for part in self._parts.values():
            for e in range(part.capacity):
                if e not in part.entries and part.free:
                    self._load(part, e, prefetch=False)
        self.transfer.synchronize()
        for part in self._parts.values():
            for entry in part.entries.values():
                entry.ticket = None

    def recover(self) -> None:
        """Make the bookkeeping whole after an interrupted invocation (Ctrl-C can land anywhere).

        Waits for every copy issued (so none can land in a slot about to be reused), drops
        entries whose copy was cancelled or failed, rebuilds each free list from the entries, and
        clears pins. Cheap when nothing is in flight; generation calls it before each run.
        """
        # queued prefetches are stale now: cancelled, not copied (their entries are dropped
        # below); synchronize waits for every copy issued, then raises if one failed: that
        # copy's entry is dropped below, and the expert is loaded again when it is used
        for part in self._parts.values():
            for entry in part.entries.values():
                if entry.ticket is not None and entry.prefetched:
                    self.transfer.cancel(entry.ticket)
        with contextlib.suppress(RuntimeError):
            self.transfer.synchronize()
        for part in self._parts.values():
            for e, entry in list(part.entries.items()):
                t = entry.ticket
                if t is not None and (t.state == CANCELLED or "error" in t.meta):
                    self._drop(part, e, cancelled=t.state == CANCELLED)
                elif entry.ticket is not None and self.transfer.is_done(entry.ticket):
                    entry.ticket = None
                entry.protected = entry.ahead = False
            used = {entry.slot for entry in part.entries.values()}
            part.free = [s for s in reversed(part.slots) if s not in used]
            part.pinned.clear()
            part.done.clear()
        self.collect_stall()  # an earlier run's last events: counted before the next run's figures start
