"""Prefetch by gate prediction: never changes the output, never overwrites a slot in use,
drops stale prefetches, and lets on-demand loads jump the queue."""

from __future__ import annotations

import pytest
import torch

from runtime.generate import SamplingConfig, generate
from runtime.transfer import ThreadedLink
from tests.helpers import greedy_ids, load_small, reference_model

PROMPT = [5, 17, 42, 99, 7, 128, 64, 3, 250, 11]


def guard_slots(lm, monkeypatch) -> dict:
    """Check at acquire and at release that the slot still holds exactly that expert's row."""
    cache, store = lm.cache, lm.store
    checks = {"n": 0}
    orig_acquire, orig_release = cache.acquire, cache.release

    def verify(layer, e):
        slot = cache.slot_of(layer, e)
        assert torch.equal(cache.slots[slot], store.row(layer, e)), f"slot of ({layer}, {e}) was overwritten"
        checks["n"] += 1

    def acquire(layer, e):
        w = orig_acquire(layer, e)
        verify(layer, e)
        return w

    def release(layer, e):
        verify(layer, e)  # compute ran in between: a copy into this slot would show here
        orig_release(layer, e)

    monkeypatch.setattr(cache, "acquire", acquire)
    monkeypatch.setattr(cache, "release", release)
    return checks


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v2", "gpt_oss"])
def test_prefetch_never_changes_the_output(arch, tiny_model, monkeypatch):
    path = tiny_model(arch)
    ref = reference_model(path)
    want = greedy_ids(ref, PROMPT, 24)
    lm = load_small(path, quant="none", slots_per_layer=3, predictor="cross-layer", predictor_extra=1,
                    lookahead=2, link_bandwidth=2e8, link_latency=2e-4)  # fmt: skip
    try:
        checks = guard_slots(lm, monkeypatch)
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=24, temperature=0, ignore_eos=True))
        assert done.token_ids == want
        st = lm.cache.stats.total()
        assert st.prefetches > 0 and st.uses == st.hits + st.late + st.misses
        assert checks["n"] == 2 * st.uses
    finally:
        lm.close()


def test_stress_tiny_budget_slow_link(tiny_model, monkeypatch):
    """One slot per layer, a very slow link and aggressive prefetch: outputs stay exact."""
    path = tiny_model("mixtral")
    ref = reference_model(path)
    want = greedy_ids(ref, PROMPT, 16)
    lm = load_small(path, quant="none", slots_per_layer=1, predictor="cross-layer", predictor_extra=3,
                    lookahead=3, link_bandwidth=5e7, link_latency=1e-3)  # fmt: skip
    try:
        guard_slots(lm, monkeypatch)
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=16, temperature=0, ignore_eos=True))
        assert done.token_ids == want
        st = lm.cache.stats.total()
        assert st.late + st.prefetch_cancelled + st.prefetch_wasted > 0  # the slow link really interfered
    finally:
        lm.close()


def slow_model(tiny_model, bandwidth=1e6):
    lm = load_small(tiny_model("mixtral"), quant="none", slots_per_layer=4, predictor="none")
    lm.cache.transfer = ThreadedLink(bandwidth=bandwidth, latency=0.0)  # ~80 ms per 80 KB expert
    return lm


def test_stale_prefetches_are_cancelled(tiny_model):
    lm = slow_model(tiny_model)
    cache = lm.cache
    try:
        for e in (0, 1, 2, 3):
            assert cache.prefetch(1, e)
        cache.begin(1, [0])  # 0 is needed; 1, 2, 3 were mispredicted and are still queued
        cache.acquire(1, 0)
        cache.release(1, 0)
        cache.end(1)
        st = cache.stats.layer(1)
        assert st.prefetch_cancelled >= 2
        assert st.bytes_moved == (4 - st.prefetch_cancelled) * cache.expert_bytes
        assert 0 in cache.resident(1)
        for e in (4, 5, 6, 7):  # the cancelled prefetches' slots are free again: the partition still holds 4
            assert cache.prefetch(1, e) or cache.is_resident(1, e)
        cache.transfer.synchronize()
        assert len(cache.resident(1)) == 4
    finally:
        lm.close()


def test_on_demand_load_jumps_the_prefetch_queue(tiny_model):
    lm = slow_model(tiny_model)
    cache = lm.cache
    link = cache.transfer
    tickets = []
    submit = link.submit
    link.submit = lambda *a, **kw: tickets.append(submit(*a, **kw)) or tickets[-1]
    try:
        for e in (0, 1, 2):
            cache.prefetch(2, e)  # the link works on 0; 1 and 2 wait
        cache.begin(3, [5])
        cache.acquire(3, 5)  # a miss on another layer
        assert torch.equal(cache.slots[cache.slot_of(3, 5)], lm.store.row(3, 5))
        cache.release(3, 5)
        cache.end(3)
        link.synchronize()
        order = [t.meta["started"] for t in tickets]  # prefetches 0, 1, 2, then the miss
        assert order[3] < order[1] < order[2]  # the miss went ahead of the queued prefetches
    finally:
        lm.close()


def test_link_survives_a_wake_up_lost_to_an_interrupt():
    """Ctrl-C can land after a copy was queued but before the worker was woken: a later
    wait or synchronize must still see the copy done, not sleep forever."""
    import heapq
    import threading

    from runtime.transfer import Ticket

    link = ThreadedLink()
    try:
        src, dst = torch.arange(8.0), torch.zeros(8)
        link.wait(link.submit(src, dst, slot=0, layer=0, urgent=False))  # the worker is idle now
        gate = threading.Lock()
        gate.acquire()
        lost = Ticket(src + 1, dst, slot=0, layer=0, urgent=False, seq=99, event=gate)
        with link._lock:  # what submit does, minus the doorbell the interrupt swallowed
            heapq.heappush(link._heap, (1, lost.seq, lost))
        done = threading.Event()
        waiter = threading.Thread(
            target=lambda: (link.synchronize(), link.wait(lost), done.set()), daemon=True
        )
        waiter.start()
        assert done.wait(timeout=10), "a queued copy whose wake-up was lost is never completed"
        assert link.is_done(lost) and torch.equal(dst, src + 1)
    finally:
        link.close()


def test_link_never_passes_off_a_failed_cancelled_or_orphaned_copy():
    """A copy that failed is not done and its wait raises; waiting on a cancelled copy raises;
    after close, waits raise instead of spinning and submits are refused."""
    link = ThreadedLink()
    try:
        bad = link.submit(torch.zeros(8), torch.zeros(4), slot=0, layer=3, urgent=True)  # shapes differ
        with pytest.raises(RuntimeError, match="layer 3 failed"):
            link.wait(bad)
        assert not link.is_done(bad)
        with pytest.raises(RuntimeError, match="layer 3 failed"):
            link.wait(bad)  # and again: never 'done' later
    finally:
        link.close()

    link = ThreadedLink(bandwidth=4e5)  # 40 KB: 0.1 s per copy
    src, dst = torch.zeros(10_000), torch.zeros(10_000)
    link.submit(src, dst, slot=0, layer=0, urgent=False)  # the worker takes this one
    queued = link.submit(src, dst.clone(), slot=1, layer=0, urgent=False)
    later = link.submit(src, dst.clone(), slot=2, layer=0, urgent=False)
    assert link.cancel(later)
    with pytest.raises(RuntimeError, match="cancelled"):
        link.wait(later)
    link.close()  # the worker finishes the copy it is on, and stops
    with pytest.raises(RuntimeError, match="worker has stopped"):
        link.wait(queued)  # never started: the worker stopped first
    with pytest.raises(RuntimeError, match="closed"):
        link.submit(src, dst, slot=0, layer=0, urgent=True)
