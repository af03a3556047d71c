"""The expert cache: policies against a plain reference simulator, slot rules, prefetch rules."""

from __future__ import annotations

import random

import pytest

from runtime.expert_cache import ExpertCache
from runtime.policies import ARC, LFU, LRU, Belady
from runtime.trace import read_trace
from tests.conftest import SHARED


def reference_hit_rate(trace: list[tuple[int, tuple[int, ...]]], policy: str, slots: int) -> float:
    """A plain per-layer simulator, written independently of runtime/: LRU or LFU, pins the token's experts."""
    resident: dict[int, list[int]] = {}
    last: dict[tuple[int, int], int] = {}
    count: dict[tuple[int, int], int] = {}
    clock = hits = uses = 0
    for layer, experts in trace:
        res = resident.setdefault(layer, [])
        for e in experts:
            uses += 1
            clock += 1
            if e in res:
                hits += 1
            else:
                if len(res) >= slots:
                    cands = [x for x in res if x not in experts]
                    if policy == "lru":
                        victim = min(cands, key=lambda x, lay=layer: last[(lay, x)])
                    else:
                        victim = min(cands, key=lambda x, lay=layer: (count.get((lay, x), 0), last[(lay, x)]))
                    res.remove(victim)
                res.append(e)
            last[(layer, e)] = clock
            count[(layer, e)] = count.get((layer, e), 0) + 1
    return hits / uses


def run_cache(trace, policy_cls, slots: int, **kw) -> float:
    layers = sorted({layer for layer, _ in trace})
    if policy_cls is Belady:
        fut = {layer: [ex for lay, ex in trace if lay == layer] for layer in layers}
        factory = lambda layer, cap: Belady(cap, fut[layer])  # noqa: E731
    else:
        factory = lambda layer, cap: policy_cls(cap)  # noqa: E731
    cache = ExpertCache({layer: slots for layer in layers}, factory, expert_bytes=1)
    for layer, experts in trace:
        for e in cache.begin(layer, experts, reorder=False):
            cache.acquire(layer, e)
            cache.release(layer, e)
        cache.end(layer)
    t = cache.stats.total()
    assert t.uses == t.hits + t.late + t.misses
    return t.hit_rate


def random_trace(seed: int, tokens=200, layers=4, experts=8, k=2) -> list[tuple[int, tuple[int, ...]]]:
    """Skewed routing (a few popular experts), like real traces."""
    rng = random.Random(seed)
    popularity = [rng.random() ** 3 + 0.01 for _ in range(experts)]
    out = []
    for _ in range(tokens):
        for layer in range(layers):
            chosen: list[int] = []
            while len(chosen) < k:
                e = rng.choices(range(experts), weights=popularity)[0]
                if e not in chosen:
                    chosen.append(e)
            out.append((layer, tuple(chosen)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("slots", [2, 3, 5])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_policies_match_reference_simulator_on_random_traces(seed, slots, policy):
    trace = random_trace(seed)
    cls = {"lru": LRU, "lfu": LFU}[policy]
    assert run_cache(trace, cls, slots) == pytest.approx(reference_hit_rate(trace, policy, slots), abs=0)


@pytest.mark.skipif(not (SHARED / "traces").is_dir(), reason="no shared traces")
@pytest.mark.parametrize("slots", [2, 4, 6])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_policies_match_reference_simulator_on_mixtral_trace(slots, policy):
    trace = [(r.layer, r.experts) for r in read_trace(SHARED / "traces" / "mixtral-8x7b-humaneval.jsonl")]
    cls = {"lru": LRU, "lfu": LFU}[policy]
    assert run_cache(trace, cls, slots) == pytest.approx(reference_hit_rate(trace, policy, slots), abs=0)


def test_belady_is_optimal_and_arc_adapts():
    for seed in range(3):
        trace = random_trace(seed)
        best = run_cache(trace, Belady, 3)
        for cls in (LRU, LFU, ARC):
            assert run_cache(trace, cls, 3) <= best
    # scan resistance: a hot pair survives a scan of one-off experts under ARC, not under LRU
    trace = [(0, (0, 1))] * 5 + [(0, (e, e + 1)) for e in range(2, 22, 2)] + [(0, (0, 1))]
    assert run_cache(trace, ARC, 4) > run_cache(trace, LRU, 4)


def test_pinned_experts_are_never_evicted():
    cache = ExpertCache({0: 2}, lambda layer, cap: LRU(cap), expert_bytes=1)
    cache.begin(0, [3, 4])
    cache.acquire(0, 3)
    cache.acquire(0, 4)
    assert cache.prefetch(0, 5) is False  # both slots pinned: the prefetch is skipped
    assert cache.resident(0) == [3, 4]
    cache.end(0)
    assert cache.prefetch(0, 5) is True  # unpinned now
    assert len(cache.resident(0)) == 2 and 5 in cache.resident(0)


def test_working_set_larger_than_partition():
    cache = ExpertCache({0: 1}, lambda layer, cap: LFU(cap), expert_bytes=1)
    order = cache.begin(0, [1, 2, 3])
    for e in order:
        cache.acquire(0, e)
        cache.release(0, e)
    cache.end(0)
    assert cache.stats.layer(0).misses == 3 and len(cache.resident(0)) == 1


def test_on_demand_mode_keeps_nothing_across_invocations():
    cache = ExpertCache({0: 2}, lambda layer, cap: LRU(cap), expert_bytes=1, retain=False)
    for needed in ([1, 2], [1, 2, 3, 4], [1, 2], [5, 6, 7]):  # some larger than the partition
        for e in cache.begin(0, needed):
            cache.acquire(0, e)
            cache.release(0, e)
        cache.end(0)
        assert cache.resident(0) == []
    assert cache.stats.layer(0).hits == 0 and cache.stats.layer(0).misses == 11


def test_prefetch_hit_and_wasted_accounting():
    cache = ExpertCache({0: 3}, lambda layer, cap: LRU(cap), expert_bytes=10)
    assert cache.prefetch(0, 1) and cache.prefetch(0, 2)
    cache.begin(0, [1])
    cache.acquire(0, 1)  # a prefetched hit
    cache.end(0)
    st = cache.stats.layer(0)
    assert (st.hits, st.prefetch_used, st.prefetches) == (1, 1, 2)
    for e in (5, 6, 7):  # evicts the never-used prefetch of 2
        cache.begin(0, [e])
        cache.acquire(0, e)
        cache.end(0)
    assert st.prefetch_wasted == 1 and st.wasted_bytes == 10


def test_a_failed_copy_is_never_served_and_recover_forgets_it():
    """A prefetch whose copy raised in the link's worker: using it raises (no stale slot is
    read as the expert), and recover() drops the entry so the next use loads it afresh."""
    import torch

    from runtime.transfer import EmulatedLink

    class Layout:
        nbytes = 16

        def views(self, row):
            return row

    class Store:
        layout = Layout()
        rows = {(0, e): torch.full((16,), e + 1, dtype=torch.uint8) for e in range(4)}

        def row(self, layer, e):
            return self.rows[(layer, e)]

    store = Store()
    good = store.rows[(0, 3)]
    store.rows[(0, 3)] = torch.ones(3, dtype=torch.uint8)  # a copy of it will raise
    link = EmulatedLink()
    cache = ExpertCache({0: 2}, lambda layer, cap: LRU(cap), store=store, transfer=link)
    try:
        cache.prefetch(0, 3)
        cache.begin(0, [3])
        with pytest.raises(RuntimeError, match="copying an expert of layer 0 failed"):
            cache.acquire(0, 3)
        cache.recover()
        assert 3 not in cache.resident(0)
        store.rows[(0, 3)] = good
        cache.begin(0, [3])
        assert torch.equal(cache.acquire(0, 3), good)
        cache.release(0, 3)
        cache.end(0)
    finally:
        link.close()


def byte_store(nbytes: int) -> type:
    """A stand-in store class whose expert ``e`` is ``nbytes`` bytes, all ``e + 1``; views are the row."""
    import torch

    class Layout:
        def views(self, row):
            return row

    Layout.nbytes = nbytes

    class Store:
        layout = Layout()

        def row(self, layer, e):
            return torch.full((nbytes,), e + 1, dtype=torch.uint8)

    return Store


def test_on_demand_mode_never_frees_a_slot_a_copy_is_still_writing():
    """With retain=False every entry is dropped at end(). A prefetch still on the link must
    be cancelled or finished first: else its bytes land in the slot after the next
    expert's, and that expert computes with the wrong weights."""
    import torch

    from tests.test_prefetch import FakeClock, fake_link

    Store = byte_store(16384)  # four pieces of 4 KiB
    clock = FakeClock()
    link = fake_link(clock, bandwidth=16384, latency=0.0)  # one piece: 0.25 s
    cache = ExpertCache({0: 2}, lambda layer, cap: LRU(cap), store=Store(), transfer=link, retain=False)
    cache.begin(0, [2])
    cache.acquire(0, 2)
    cache.release(0, 2)
    assert cache.prefetch(0, 1)
    clock.now += 0.3  # its first piece has moved: it can no longer be cancelled
    cache.end(0)
    assert cache.resident(0) == []
    cache.begin(0, [3])
    w = cache.acquire(0, 3)
    cache.release(0, 3)
    cache.end(0)
    link.synchronize()
    assert torch.equal(w, Store().row(0, 3))  # nothing landed in its slot afterwards


def test_recover_cancels_queued_prefetches_instead_of_copying_them():
    """After Ctrl-C the predictions in the queue are stale: recover() drops them unmoved and
    waits only for the copy already on the link."""
    import torch

    from tests.test_prefetch import FakeClock, fake_link

    class Layout:
        nbytes = 4096  # one piece

        def views(self, row):
            return row

    class Store:
        layout = Layout()

        def row(self, layer, e):
            return torch.full((4096,), e + 1, dtype=torch.uint8)

    clock = FakeClock()
    link = fake_link(clock, bandwidth=4096, latency=0.0)  # one expert: 1 s
    cache = ExpertCache({0: 4}, lambda layer, cap: LRU(cap), store=Store(), transfer=link)
    for e in (1, 2, 3):
        assert cache.prefetch(0, e)
    clock.now += 0.5  # expert 1 is on the link, 2 and 3 are queued
    cache.recover()
    assert cache.resident(0) == [1]
    assert clock.now == pytest.approx(1.0)  # waited for expert 1 only
    st = cache.stats.layer(0)
    assert st.prefetch_cancelled == 2 and st.bytes_moved == 4096


def test_load_ahead_copies_a_miss_while_the_resident_experts_compute():
    """load_ahead starts a miss's copy at once, into a free slot or one whose expert this
    invocation does not need; the copy moves while compute runs, acquire counts a miss (not
    a hit, nor a late prefetch) and waits only for what is left of the copy."""
    import torch

    from tests.test_prefetch import FakeClock, fake_link

    Store = byte_store(4096)
    clock = FakeClock()
    link = fake_link(clock, bandwidth=4096, latency=0.0)  # a copy takes 1 s
    cache = ExpertCache({0: 2}, lambda layer, cap: LRU(cap), store=Store(), transfer=link)
    cache.begin(0, [1])
    cache.acquire(0, 1)  # a miss: 1 s
    cache.release(0, 1)
    cache.end(0)
    clock.now += 5
    st = cache.stats.layer(0)
    before = (st.uses, st.hits, st.misses, st.late, st.bytes_moved)
    cache.begin(0, [1, 2])
    assert cache.load_ahead(0, 2)  # the free slot
    assert not cache.load_ahead(0, 2)  # already on its way
    clock.now += 0.75  # expert 1 computes meanwhile
    cache.acquire(0, 1)
    cache.release(0, 1)
    w = cache.acquire(0, 2)
    cache.release(0, 2)
    cache.end(0)
    assert torch.equal(w, Store().row(0, 2))
    assert (st.uses, st.hits, st.misses, st.late, st.bytes_moved) == (
        before[0] + 2,
        before[1] + 1,
        before[2] + 1,
        before[3],
        before[4] + 4096,
    )
    assert st.stall_s == pytest.approx(1 + 0.25)  # the first miss's whole copy, then what was left
    # a full partition whose experts this invocation needs: nothing to take, nothing waited for
    cache.begin(0, [1, 2, 3])
    assert not cache.load_ahead(0, 3)
    cache.end(0)
    # an expert it does not need is taken; a copy done before compute asks is still a miss
    clock.now += 5
    cache.begin(0, [2, 3])
    assert cache.load_ahead(0, 3) and cache.resident(0) == [2, 3]
    clock.now += 2
    misses, hits = st.misses, st.hits
    cache.acquire(0, 3)
    cache.end(0)
    assert (st.misses, st.hits) == (misses + 1, hits)
    # a prefetch still moving is never taken, and a miss waits for nothing: no slot, no copy
    clock.now += 5
    cache.begin(0, [2])
    cache.acquire(0, 2)
    cache.end(0)
    assert cache.prefetch(0, 4)  # evicts 3; on the link for 1 s
    cache.begin(0, [2, 5])
    assert not cache.load_ahead(0, 5) and 4 in cache.resident(0)
    cache.end(0)
    # an invocation cut short after load_ahead (Ctrl-C): the expert copied stays, and its next
    # use is the hit it then is, after end() and after recover()
    for e, finish in ((6, cache.end), (7, lambda layer: cache.recover())):
        clock.now += 5
        cache.begin(0, [e])
        assert cache.load_ahead(0, e)
        finish(0)
        clock.now += 5
        cache.begin(0, [e])
        hits = st.hits
        cache.acquire(0, e)
        cache.end(0)
        assert st.hits == hits + 1


def test_a_needed_prefetch_still_queued_goes_ahead_of_the_misses_copies():
    """begin() hurries the prefetches the invocation needs: computed before its misses, they
    are copied before them too (on the link a queued prefetch would otherwise wait behind
    every on-demand copy, including the misses' early ones)."""
    from tests.test_prefetch import FakeClock, fake_link

    Store = byte_store(16384)  # four pieces of 4 KiB
    clock = FakeClock()
    link = fake_link(clock, bandwidth=16384, latency=0.0)  # a piece: 0.25 s, a whole copy: 1 s
    cache = ExpertCache({0: 3}, lambda layer, cap: LRU(cap), store=Store(), transfer=link)
    assert cache.prefetch(0, 1) and cache.prefetch(0, 2)  # 1 on the link, 2 queued behind it
    assert cache.begin(0, [2, 3]) == [2, 3]
    assert cache.load_ahead(0, 3)
    clock.now = 1.3  # 1's first piece, then all of 2 (0.25 to 1.25), then 3
    entries = cache._parts[0].entries
    assert link.is_done(entries[2].ticket) and not link.is_done(entries[3].ticket)
    link.synchronize()


def textbook_arc(requests: list[int], c: int) -> list[bool]:
    """ARC as Megiddo & Modha's paper gives it (FAST 2003, Fig. 4), written independently of
    runtime/: one hit flag per request, for a cache of ``c`` pages, p real-valued."""
    from collections import OrderedDict

    t1, t2, b1, b2 = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()
    p = 0.0
    hits = []

    def replace(x):
        if t1 and (len(t1) > p or (x in b2 and len(t1) == p)):
            b1[t1.popitem(last=False)[0]] = None
        else:
            b2[t2.popitem(last=False)[0]] = None

    for x in requests:
        hits.append(x in t1 or x in t2)
        if hits[-1]:  # case I
            t1.pop(x, None)
            t2.pop(x, None)
            t2[x] = None
        elif x in b1:  # case II
            p = min(c, p + max(len(b2) / len(b1), 1))
            replace(x)
            del b1[x]
            t2[x] = None
        elif x in b2:  # case III
            p = max(0, p - max(len(b1) / len(b2), 1))
            replace(x)
            del b2[x]
            t2[x] = None
        else:  # case IV
            if len(t1) + len(b1) == c:
                if len(t1) < c:
                    b1.popitem(last=False)
                    replace(x)
                else:
                    t1.popitem(last=False)
            elif len(t1) + len(b1) + len(t2) + len(b2) >= c:
                if len(t1) + len(b1) + len(t2) + len(b2) == 2 * c:
                    b2.popitem(last=False)
                replace(x)
            t1[x] = None
    return hits


@pytest.mark.parametrize("seed", range(40))
def test_arc_follows_the_paper_request_by_request(seed):
    """One expert a token, so nothing is pinned but the one requested: the cache with ARC
    hits exactly where the paper's ARC does, on phases of hot sets and scans that make its
    target move both ways."""
    rng = random.Random(seed)
    n = rng.choice([6, 8, 16, 32])
    c = rng.randint(1, n - 1)
    requests = []
    for _ in range(rng.randint(5, 15)):
        if rng.random() < 0.5:
            hot = rng.sample(range(n), rng.randint(1, c))
            requests += [rng.choice(hot) for _ in range(rng.randint(5, 40))]
        else:
            requests += [rng.randrange(n) for _ in range(rng.randint(5, 40))]
    cache = ExpertCache({0: c}, lambda layer, cap: ARC(cap), expert_bytes=1)
    hits = []
    for x in requests:
        before = cache.stats.layer(0).hits
        _use(cache, 0, x)
        hits.append(cache.stats.layer(0).hits > before)
    assert hits == textbook_arc(requests, c)


def test_arc_grows_its_recency_target_on_a_ghost_hit():
    arc = ARC(2)
    arc.on_insert(1)
    arc.on_insert(2)
    arc.on_evict(1)  # 1 is now a ghost of the recency list
    arc.victim([2], incoming=1)
    assert arc.p > 0


def test_lru_counts_an_insert_as_a_use():
    lru = LRU(2)
    lru.on_insert(1)
    lru.on_access(1, False)
    lru.on_insert(2)  # inserted after 1's last use: 1 is the older
    assert lru.victim([1, 2], incoming=3) == 1


def _slow_cache(capacity: int = 3) -> ExpertCache:
    """One layer on a fake link where a copy takes 1 s of a clock that never moves by itself."""
    from tests.test_prefetch import FakeClock, fake_link

    link = fake_link(FakeClock(), bandwidth=4096, latency=0.0)
    return ExpertCache({0: capacity}, lambda layer, n: LRU(n), store=byte_store(4096)(), transfer=link)


def _use(cache: ExpertCache, layer: int, expert: int) -> None:
    cache.begin(layer, [expert])
    cache.acquire(layer, expert)
    cache.release(layer, expert)
    cache.end(layer)


def test_begin_orders_resident_then_in_flight_then_missing():
    """Reordered inference (ProMoE): what is there computes first, what must be copied last."""
    cache = _slow_cache()
    _use(cache, 0, 1)
    assert cache.prefetch(0, 2)  # on the link
    assert cache.begin(0, [3, 2, 1]) == [1, 2, 3]


def test_a_prefetch_never_evicts_another_made_for_the_same_invocation():
    cache = ExpertCache({0: 2}, lambda layer, n: LRU(n), expert_bytes=1)
    assert cache.prefetch(0, 1) and cache.prefetch(0, 2)
    assert not cache.prefetch(0, 3)
    assert cache.resident(0) == [1, 2]


def test_predicting_a_resident_expert_protects_it_from_the_next_prefetch():
    cache = ExpertCache({0: 2}, lambda layer, n: LRU(n), expert_bytes=1)
    _use(cache, 0, 1)
    assert not cache.prefetch(0, 1)  # resident: nothing to copy, but wanted next
    assert cache.prefetch(0, 2)
    assert not cache.prefetch(0, 3)
    assert cache.resident(0) == [1, 2]


def test_a_prefetch_still_copying_when_used_counts_late_not_hit():
    cache = _slow_cache()
    assert cache.prefetch(0, 1)
    cache.begin(0, [1])
    cache.acquire(0, 1)
    cache.end(0)
    st = cache.stats.layer(0)
    assert (st.late, st.hits, st.misses) == (1, 0, 0)


def test_release_tells_the_copy_engine_the_slot_may_be_overwritten():
    from runtime.transfer import InlineCopy

    released = []

    class Spy(InlineCopy):
        def slot_released(self, slot):
            released.append(slot)

    cache = ExpertCache({0: 2}, lambda layer, n: LRU(n), store=byte_store(16)(), transfer=Spy())
    _use(cache, 0, 1)
    assert released == [cache.slot_of(0, 1)]


@pytest.mark.parametrize("at", [0.0, 0.3])
def test_a_miss_with_only_copies_in_flight_never_gives_up_a_needed_expert(at):
    """No slot is free or ready: a needed prefetch is on the link (1) and an unneeded copy (2,
    an invocation cut short after load_ahead) is queued behind it or, once it has started,
    moving. The miss takes 2's slot, cancelling its copy while it can and waiting for it when
    it cannot; 1 stays and is used as the late prefetch it is. Every wait is stall."""
    from tests.test_prefetch import FakeClock, fake_link

    clock = FakeClock()
    link = fake_link(clock, bandwidth=16384, latency=0.0)  # four pieces of 4 KiB, 1 s a copy
    cache = ExpertCache({0: 2}, lambda layer, n: LRU(n), store=byte_store(16384)(), transfer=link)
    assert cache.prefetch(0, 1)
    cache.begin(0, [2])
    assert cache.load_ahead(0, 2)  # urgent: moves after 1's first piece
    cache.end(0)
    clock.now = at
    cache.begin(0, [3, 1], reorder=False)
    cache.acquire(0, 3)
    cache.release(0, 3)
    st = cache.stats.layer(0)
    assert cache.resident(0) == [1, 3]
    assert st.stall_s == pytest.approx(clock.now - at)
    assert st.bytes_moved == (2 if at == 0.0 else 3) * 16384  # 2 cancelled unmoved, or moved
    assert st.prefetch_cancelled == 0  # 2 was a miss's copy, not a prefetch
    cache.acquire(0, 1)
    cache.release(0, 1)
    cache.end(0)
    assert (st.misses, st.late, st.prefetch_used) == (1, 1, 1)


def test_recover_frees_the_slot_of_a_cancelled_prefetch():
    """After Ctrl-C a queued prefetch is dropped unmoved, and its slot is free again: each
    interrupted answer would otherwise leave the cache a slot smaller."""
    from tests.test_prefetch import FakeClock, fake_link

    clock = FakeClock()
    link = fake_link(clock, bandwidth=4096, latency=0.0)  # a copy: 1 s
    cache = ExpertCache({0: 2}, lambda layer, n: LRU(n), store=byte_store(4096)(), transfer=link)
    assert cache.prefetch(0, 1) and cache.prefetch(0, 2)
    clock.now += 0.5  # 1 on the link, 2 queued
    cache.recover()
    assert cache.resident(0) == [1]
    clock.now += 5
    _use(cache, 0, 3)
    assert cache.resident(0) == [1, 3]  # into the freed slot: 1 was not evicted
    assert cache.stats.layer(0).misses == 1


def test_uses_served_without_a_slot_count_for_the_policy():
    """A miss computed on the host (or from a low-bit copy) is still a use: LFU counts it."""
    cache = ExpertCache({0: 2}, lambda layer, n: LFU(n), expert_bytes=1)
    _use(cache, 0, 1)
    _use(cache, 0, 3)
    for _ in range(3):
        cache.begin(0, [2])
        cache.record_bypass(0, 2, "host", nbytes=0, stall_s=0.0)
        cache.end(0)
    _use(cache, 0, 2)  # evicts 1 (the older of two used once)
    _use(cache, 0, 3)  # 3: used twice, now the more recent
    _use(cache, 0, 4)  # 2 (four uses) stays, 3 (two) goes
    assert cache.resident(0) == [2, 4]
    st = cache.stats.layer(0)
    assert (st.uses, st.misses, st.cpu_computed) == (8, 7, 3)


def test_fill_loads_every_expert_a_layer_has_room_for():
    cache = ExpertCache({0: 3, 1: 8}, lambda layer, n: LRU(n), expert_bytes=1)
    cache.fill()
    assert cache.resident(0) == [0, 1, 2] and cache.resident(1) == list(range(8))


def test_impossible_slot_counts_are_refused():
    with pytest.raises(ValueError, match="0 or more"):
        ExpertCache({0: 2, 1: -1}, lambda layer, n: LRU(n), expert_bytes=1)
    ExpertCache({0: 0}, lambda layer, n: LRU(n), expert_bytes=1)  # a layer that streams: no slot
