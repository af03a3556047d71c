"""Prefetch by gate prediction: never changes the output, never overwrites a slot in use,
drops stale prefetches, and lets on-demand loads jump the queue."""

from __future__ import annotations

import itertools

import pytest
import torch

from runtime.generate import SamplingConfig, generate
from runtime.transfer import EmulatedLink, chunk_bounds
from tests.helpers import greedy_ids, interrupt_at_line, load_small, reference_model

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
    lm.cache.transfer = EmulatedLink(bandwidth=bandwidth, latency=0.0)  # ~80 ms per 80 KB expert
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


class FakeClock:
    """A clock that moves only when the code under test sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def fake_link(clock: FakeClock, bandwidth=1e3, latency=0.5) -> EmulatedLink:
    return EmulatedLink(bandwidth, latency, clock=clock, sleep=clock.sleep)


def test_emulated_link_keeps_a_timeline_of_one_copy_at_a_time():
    """Each copy lasts latency + bytes / bandwidth from when the link takes it; copies queue
    behind each other; an on-demand copy goes ahead of queued prefetches, not of the copy
    in progress; a wait sleeps exactly until the copy's end, which is its stall; bytes land
    in the slot when the copy ends, not before."""
    clock = FakeClock()
    link = fake_link(clock)  # 1000 B/s and 0.5 s: a 2000-byte copy takes 2.5 s
    src = [torch.full((500,), float(i)) for i in range(4)]  # 500 float32 = 2000 bytes
    dst = [torch.zeros(500) for _ in range(4)]
    a = link.submit(src[0], dst[0], slot=0, layer=0, urgent=False)  # runs 0 - 2.5
    b = link.submit(src[1], dst[1], slot=1, layer=0, urgent=False)  # queued
    clock.now = 1.0
    c = link.submit(src[2], dst[2], slot=2, layer=1, urgent=True)  # jumps b: runs 2.5 - 5.0
    assert (a.state, b.state, c.state) == ("running", "queued", "queued")
    assert not dst[0].any(), "bytes must not land before the copy's end"
    assert link.wait(c) == pytest.approx(4.0)  # from 1.0 to 5.0
    assert torch.equal(dst[2], src[2]) and torch.equal(dst[0], src[0])
    assert link.is_done(a) and link.is_done(c) and b.state == "running"  # b took the link at 5.0
    assert not dst[1].any()
    assert link.cancel(b) is False  # started: too late to cancel
    d = link.submit(src[3], dst[3], slot=3, layer=1, urgent=False)  # queued behind b
    assert link.cancel(d) and d.state == "cancelled"
    link.synchronize()
    assert clock.now == pytest.approx(7.5) and torch.equal(dst[1], src[1]) and not dst[3].any()
    assert [t.meta["started"] for t in (a, c, b)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="cancelled"):
        link.wait(d)


@pytest.mark.parametrize("chunks", [4, 1])
def test_an_on_demand_copy_waits_for_one_piece_of_a_prefetch(chunks):
    """Chunked prefetch (ProMoE): a prefetch moves in pieces, so an on-demand copy arriving
    while it moves waits for the piece in progress only, then the prefetch resumes; a
    prefetch waited on has its pieces left moved in one run. Unchunked, the on-demand
    copy waits for the whole prefetch."""
    clock = FakeClock()
    link = EmulatedLink(4096.0, 0.0, chunks=chunks, clock=clock, sleep=clock.sleep)  # 1 s per 4 KiB
    big = [torch.full((4096,), float(i + 1)) for i in range(2)]  # 16 KiB: 4 pieces of 4 KiB
    dst = [torch.zeros(4096) for _ in range(2)]
    a = link.submit(big[0], dst[0], slot=0, layer=0, urgent=False)
    b = link.submit(big[1], dst[1], slot=1, layer=0, urgent=False)
    clock.now = 1.5
    u = link.submit(torch.ones(1024), torch.zeros(1024), slot=2, layer=1, urgent=True)  # 4 KiB: 1 s
    if chunks == 1:
        assert link.wait(u) == pytest.approx(3.5)  # behind all of a (0 - 4), then 4 - 5
        return
    assert link.wait(u) == pytest.approx(1.5)  # a's piece 1 - 2 ends, then u runs 2 - 3
    assert not link.is_done(a) and not dst[0].any()
    assert link.wait(a) == pytest.approx(2.0)  # a's two pieces left, in one run: 3 - 5
    assert torch.equal(dst[0], big[0]) and b.state == "running"  # b took the link at 5
    clock.now = 5.5
    assert not link.cancel(b)  # a piece of it has moved: it can no longer be cancelled
    v = link.submit(torch.ones(1024), torch.zeros(1024), slot=3, layer=1, urgent=True)
    assert link.wait(v) == pytest.approx(1.5)  # b's first piece ends at 6, v runs 6 - 7
    link.synchronize()
    assert clock.now == pytest.approx(10.0) and torch.equal(dst[1], big[1])  # b: 5 - 6, 7 - 10


def byte_row(nbytes: int, seed: int = 0) -> torch.Tensor:
    """A host row of ``nbytes`` bytes with contents that differ from byte to byte (never all zero)."""
    return ((torch.arange(nbytes) + seed) % 251 + 1).to(torch.uint8)


def test_an_on_demand_copy_moves_as_one_piece():
    """Each piece on the link pays its latency. A prefetch of 16 KiB moves in 4 pieces (4
    latencies); an on-demand copy of the same row is one piece, so it pays the latency once."""
    clock = FakeClock()
    link = EmulatedLink(4096.0, 0.5, chunks=4, clock=clock, sleep=clock.sleep)  # 1 s per 4 KiB + 0.5
    src, dst = byte_row(16384), torch.zeros(16384, dtype=torch.uint8)
    p = link.submit(src, dst, slot=0, layer=0, urgent=False)
    link.synchronize()
    assert clock.now == pytest.approx(4 * 0.5 + 4.0) and p.state == "done" and torch.equal(dst, src)
    dst.zero_()
    u = link.submit(src, dst, slot=0, layer=0, urgent=True)
    assert link.wait(u) == pytest.approx(0.5 + 4.0)
    assert torch.equal(dst, src)


def test_copy_now_goes_ahead_of_queued_prefetches_and_waits_for_itself_only():
    """copy_now (a miss served from the buffer outside the slots) is urgent: it waits for
    the piece of a prefetch in progress, then moves in one piece ahead of the prefetches
    queued, and returns when its own bytes have landed, while the prefetches' have not."""
    clock = FakeClock()
    link = EmulatedLink(4096.0, 0.25, chunks=4, clock=clock, sleep=clock.sleep)  # 1 s per 4 KiB + 0.25
    rows = [byte_row(16384, seed=i) for i in range(2)]  # 4 pieces of 1.25 s each
    slots = [torch.zeros(16384, dtype=torch.uint8) for _ in range(2)]
    a = link.submit(rows[0], slots[0], slot=0, layer=0, urgent=False)  # first piece 0 - 1.25
    b = link.submit(rows[1], slots[1], slot=1, layer=0, urgent=False)  # queued behind a
    clock.now = 0.5
    src, buf = byte_row(8192, seed=7), torch.zeros(8192, dtype=torch.uint8)
    assert link.copy_now(src, buf, layer=3) == pytest.approx(3.0)  # 1.25 - 3.5: 0.25 + 2 s, one piece
    assert clock.now == pytest.approx(3.5) and torch.equal(buf, src)
    assert not slots[0].any() and not slots[1].any()  # neither prefetch has landed
    assert not link.is_done(a) and not link.is_done(b)
    link.synchronize()  # a's 3 pieces left 3.5 - 7.25, then b's 4: 7.25 - 12.25
    assert clock.now == pytest.approx(12.25)
    assert torch.equal(slots[0], rows[0]) and torch.equal(slots[1], rows[1]) and torch.equal(buf, src)


SIZES = [1, 2, 3, 100, 4095, 4096, 4097, 5000, 8191, 8192, 8193, 12288, 16383, 16384, 16385, 100_000, 1 << 20]


@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 7, 16])
def test_prefetch_pieces_are_never_empty_and_cover_the_row_exactly(chunks):
    """However small the row, its pieces are at most ``chunks``, none empty, 4 KiB-aligned
    inside, and together exactly the row."""
    for nbytes in SIZES:
        bounds = chunk_bounds(nbytes, chunks)
        assert bounds[0] == 0 and bounds[-1] == nbytes, (nbytes, bounds)
        assert all(a < b for a, b in itertools.pairwise(bounds)), (nbytes, bounds)
        assert 1 <= len(bounds) - 1 <= chunks, (nbytes, bounds)
        assert all(b % 4096 == 0 for b in bounds[1:-1]), (nbytes, bounds)


PIECES = [(1, 1), (100, 1), (4095, 1), (4096, 1), (4097, 2), (5000, 2), (8192, 2), (8193, 3), (16384, 4)]


@pytest.mark.parametrize(("nbytes", "pieces"), PIECES)
def test_a_small_prefetch_pays_the_latency_once_per_real_piece(nbytes, pieces):
    """A row of up to 4 KiB is one piece (an empty piece would still cost the link its
    latency); bigger rows split on 4 KiB pages into at most 4 pieces. The bytes all land."""
    clock = FakeClock()
    link = EmulatedLink(4096.0, 1.0, chunks=4, clock=clock, sleep=clock.sleep)
    src, dst = byte_row(nbytes), torch.zeros(nbytes, dtype=torch.uint8)
    t = link.submit(src, dst, slot=0, layer=0, urgent=False)
    link.synchronize()
    assert clock.now == pytest.approx(pieces * 1.0 + nbytes / 4096.0)
    assert t.state == "done" and torch.equal(dst, src)


def test_emulated_link_idle_time_is_not_carried_over():
    """A copy submitted to an idle link starts when it is submitted, not when the last one ended;
    a wait on a copy already over costs nothing."""
    clock = FakeClock()
    link = fake_link(clock, bandwidth=None, latency=1.0)
    t = link.submit(torch.ones(4), torch.zeros(4), slot=0, layer=0, urgent=True)
    clock.now = 10.0
    assert link.wait(t) == 0.0 and clock.slept == []
    u = link.submit(torch.ones(4), torch.zeros(4), slot=1, layer=0, urgent=True)
    assert link.wait(u) == pytest.approx(1.0)  # 10.0 to 11.0, not 1.0 to 2.0


def test_emulated_link_survives_an_interrupt_at_every_line():
    """Ctrl-C can land between any two lines of the link's code. Raise KeyboardInterrupt at
    each line reached in turn, then do what recover() does (synchronize): it ends (no
    hang), every copy the caller holds is either cancelled with its slot untouched or done
    with its bytes in place, and a copy whose submit was interrupted still lands before
    synchronize returns (its slot may be reused next)."""

    def scenario(link, clock, srcs, dsts, held):
        for i in range(4):
            held.append(link.submit(srcs[i], dsts[i], slot=i, layer=0, urgent=i == 2))
        clock.now += 0.3
        link.cancel(held[3])
        link.is_done(held[0])
        link.wait(held[1])
        link.synchronize()

    n, interrupted_runs = 0, 0
    while True:
        n += 1
        clock = FakeClock()
        link = fake_link(clock, bandwidth=1e4, latency=0.1)
        srcs = [torch.full((4096,), float(i + 1)) for i in range(4)]  # 16 KiB: prefetches in 4 pieces
        dsts = [torch.zeros(4096) for _ in range(4)]
        held = []
        with interrupt_at_line(n, "transfer.py") as run:
            scenario(link, clock, srcs, dsts, held)
        link.synchronize()
        for i, t in enumerate(held):
            if t.state == "cancelled":
                assert not dsts[i].any()
            else:
                assert t.state == "done" and torch.equal(dsts[i], srcs[i])
        for i in range(len(held), 4):  # submitted (maybe) but never handed back
            assert torch.equal(dsts[i], srcs[i]) or not dsts[i].any()
        if run.finished:
            break
        interrupted_runs += 1
        assert n < 2000
    assert interrupted_runs > 30  # the scenario really ran through many interrupt points


def test_link_never_passes_off_a_failed_cancelled_or_orphaned_copy():
    """A copy that failed is not done and its wait raises; waiting on a cancelled copy raises;
    after close, waits raise instead of spinning and submits are refused."""
    link = EmulatedLink()
    try:
        bad = link.submit(torch.zeros(8), torch.zeros(4), slot=0, layer=3, urgent=True)  # shapes differ
        with pytest.raises(RuntimeError, match="layer 3 failed"):
            link.wait(bad)
        assert not link.is_done(bad)
        with pytest.raises(RuntimeError, match="layer 3 failed"):
            link.wait(bad)  # and again: never 'done' later
    finally:
        link.close()

    clock = FakeClock()
    link = fake_link(clock)
    src, dst = torch.zeros(1000), torch.zeros(1000)
    link.submit(src, dst, slot=0, layer=0, urgent=False)  # the link takes this one
    later = link.submit(src, dst.clone(), slot=2, layer=0, urgent=False)
    assert link.cancel(later)
    with pytest.raises(RuntimeError, match="cancelled"):
        link.wait(later)
    link.close()
    with pytest.raises(RuntimeError, match="closed"):
        link.submit(src, dst, slot=0, layer=0, urgent=True)


@pytest.mark.parametrize("predictor", ["none", "cross-layer"])
def test_every_configuration_on_an_emulated_link_shares_one_link_model(tiny_model, predictor):
    """Reactive and prefetching runs are compared on the same link: with a link emulated,
    both copy through EmulatedLink (so on-demand loads queue behind copies in progress);
    without one, copies are plain memory copies."""
    from runtime.transfer import InlineCopy

    path = tiny_model("mixtral")
    lm = load_small(path, quant="none", slots_per_layer=2, predictor=predictor, link_bandwidth=1e9)
    plain = load_small(path, quant="none", slots_per_layer=2, predictor=predictor)
    try:
        assert isinstance(lm.cache.transfer, EmulatedLink) and lm.cache.transfer.bandwidth == 1e9
        assert isinstance(plain.cache.transfer, InlineCopy)
    finally:
        lm.close()
        plain.close()


def test_prediction_precision_and_recall_are_scored_against_the_experts_used():
    from runtime.expert_cache import ExpertCache
    from runtime.policies import LRU
    from runtime.prefetch import Prefetcher

    class Predicts12:  # from layer 0: experts 1 and 2 for layer 1
        def predict(self, layer, hidden):
            return [(1, [1, 2])] if layer == 0 else []

    cache = ExpertCache({0: 2, 1: 2}, lambda layer, n: LRU(n), expert_bytes=1)
    pf = Prefetcher(Predicts12(), cache)
    pf.on_layer(0, [0], torch.zeros(1, 4))
    pf.on_layer(1, [1], torch.zeros(1, 4))  # layer 1 used only expert 1
    st = cache.stats.layer(1)
    assert (st.pred_tp, st.pred_fp, st.pred_fn) == (1, 1, 0)


def test_experts_are_ranked_by_gate_score_and_unchosen_ones_dropped():
    from runtime.prefetch import rank_experts

    assert rank_experts(torch.tensor([[3, 1]]), torch.tensor([[0.2, 0.8]]), 4) == [1, 3]
    assert sorted(rank_experts(torch.tensor([[0, 1], [1, 0]]), None, 8)) == [0, 1]


def test_cancel_refuses_a_copy_the_link_has_taken_by_now():
    """A queued copy the link started since the last look cannot be cancelled: reported as
    cancelled, its bytes would still land, in a slot the cache had given to another expert."""
    clock = FakeClock()
    link = fake_link(clock)  # 1000 B/s and 0.5 s: a 2000-byte copy takes 2.5 s
    a = link.submit(torch.ones(500), torch.zeros(500), slot=0, layer=0, urgent=False)
    dst = torch.zeros(500)
    b = link.submit(torch.ones(500), dst, slot=1, layer=0, urgent=False)
    assert b.state == "queued"
    clock.now = 3.0  # a ended at 2.5, and b took the link then
    assert link.cancel(b) is False and b.state != "cancelled"
    link.synchronize()
    assert a.state == b.state == "done" and dst.all()


class LinearRouter(torch.nn.Module):
    """A router stand-in: logits = the identity of the hidden state (so a test writes the logits
    as the input), then softmax top-k, returning (logits, scores, indices) as transformers' do."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.lin = torch.nn.Linear(num_experts, num_experts, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(num_experts))

    def forward(self, hidden):
        logits = self.lin(hidden)  # [T, E]
        scores, indices = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)  # [T, K]
        return logits, scores, indices


def cross_layer(moe_layers, top_k=2, num_experts=6, **kw):
    from runtime.prefetch import CrossLayerPredictor

    routers = {layer: LinearRouter(num_experts, top_k) for layer in moe_layers}
    return CrossLayerPredictor(routers, moe_layers, top_k, num_experts, **kw)


def test_cross_layer_stops_at_the_last_moe_layer():
    """Looking further ahead than the MoE layers left predicts only those left (the MoE
    layers need not be consecutive layer numbers), and nothing from the last one."""
    pred = cross_layer([1, 3, 5], lookahead=3)
    h = torch.tensor([[0.0, 3.0, 1.0, 0.0, 2.0, 0.0]])  # top-2 of any router here: 1, then 4
    assert pred.predict(1, h) == [(3, [1, 4]), (5, [1, 4])]
    assert pred.predict(3, h) == [(5, [1, 4])]
    assert pred.predict(5, h) == []
    assert cross_layer([1, 3, 5], lookahead=1).predict(5, h) == []


def test_prefill_ranking_breaks_count_ties_by_total_score_and_drops_unchosen_experts():
    from runtime.prefetch import rank_experts

    indices = torch.tensor([[0, 2], [2, 0], [1, 3], [5, 3]])  # chosen: 0, 2, 3 twice; 1, 5 once; 4 never
    scores = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.8, 0.2]])
    # total scores: 2 (1.3) > 3 (0.9) > 0 (0.7), and 5 (0.8) > 1 (0.3); 5 stays behind 0: a count beats a score
    assert rank_experts(indices, scores, 6) == [2, 3, 0, 5, 1]
    assert sorted(rank_experts(indices, None, 6)) == [0, 1, 2, 3, 5]  # no scores: the same set


def test_wider_candidates_follow_the_top_k_ranking_without_duplicates():
    """With ``extra``: the experts the router picks (most-chosen first), then the next most
    likely by logits over the tokens, each once."""
    pred = cross_layer([0, 1], top_k=1, num_experts=6, extra=1)
    h = torch.tensor([  # per token, top-1 then the second most likely
        [5.0, 4.0, 0.0, 0.0, 0.0, 0.0],  # 0, then 1
        [5.0, 0.0, 4.0, 0.0, 0.0, 0.0],  # 0, then 2
        [0.0, 0.0, 4.0, 5.0, 0.0, 0.0],  # 3, then 2
    ])  # fmt: skip
    # top-1: 0 twice, 3 once; top-2 adds 2 (twice) then 1 (once); 4 and 5 never
    assert pred.predict(0, h) == [(1, [0, 3, 2, 1])]
    wide = cross_layer([0, 1], top_k=1, num_experts=6, extra=10).predict(0, h)[0][1]  # capped at E
    assert wide[:2] == [0, 3] and sorted(wide) == list(range(6))


def prefetcher_on_small_cache(predictor, layers=(0, 1, 2), slots=4):
    from runtime.expert_cache import ExpertCache
    from runtime.policies import LRU
    from runtime.prefetch import Prefetcher

    cache = ExpertCache({layer: slots for layer in layers}, lambda layer, n: LRU(n), expert_bytes=1)
    return Prefetcher(predictor, cache), cache


def scored(cache, layer):
    st = cache.stats.layer(layer)
    return st.pred_tp, st.pred_fp, st.pred_fn


def test_predictions_for_several_layers_ahead_are_each_scored_at_their_layer():
    class FromLayer0:  # layer 0 looks two layers ahead; the others predict nothing
        def predict(self, layer, hidden):
            return [(1, [1, 2]), (2, [3, 0])] if layer == 0 else []

    pf, cache = prefetcher_on_small_cache(FromLayer0())
    pf.on_layer(0, [0], torch.zeros(1, 4))
    pf.on_layer(1, [1], torch.zeros(1, 4))
    assert scored(cache, 1) == (1, 1, 0) and scored(cache, 2) == (0, 0, 0)
    pf.on_layer(2, [3, 4], torch.zeros(1, 4))  # layer 0's prediction for layer 2 was kept
    assert scored(cache, 2) == (1, 1, 1)
    pf.on_layer(2, [3, 4], torch.zeros(1, 4))  # scored once: nothing pending for it now
    assert scored(cache, 2) == (1, 1, 1)


def test_cross_layer_prefetcher_scores_each_layer_against_its_own_experts():
    """The cross-layer predictor two layers ahead through the prefetcher: each layer's
    prediction is scored against what that layer used, not another layer's."""
    pf, cache = prefetcher_on_small_cache(cross_layer([0, 1, 2], top_k=2, num_experts=6, lookahead=2))
    h = torch.tensor([[0.0, 3.0, 1.0, 0.0, 2.0, 0.0]])  # predicts 1 and 4 for every layer
    pf.on_layer(0, [0, 1], h)
    pf.on_layer(1, [1, 4], h)
    pf.on_layer(2, [2, 3], h)
    assert [scored(cache, layer) for layer in (0, 1, 2)] == [(0, 0, 0), (2, 0, 0), (0, 2, 2)]


def test_reset_forgets_pending_predictions():
    class FromLayer0:
        def predict(self, layer, hidden):
            return [(1, [1, 2]), (2, [3])] if layer == 0 else []

    pf, cache = prefetcher_on_small_cache(FromLayer0())
    pf.on_layer(0, [0], torch.zeros(1, 4))
    pf.reset()
    pf.on_layer(1, [1], torch.zeros(1, 4))
    pf.on_layer(2, [3], torch.zeros(1, 4))
    assert scored(cache, 1) == scored(cache, 2) == (0, 0, 0)


def test_a_new_sequence_is_not_scored_against_the_last_ones_predictions(tiny_model):
    """A prediction still pending when a sequence ends (here: the last MoE layer predicting
    the first one of the next token) is dropped when the next sequence starts."""
    lm = load_small(tiny_model("mixtral"), quant="none", slots_per_layer=2, predictor="cross-layer")
    first, last = lm.spec.moe_layers[0], lm.spec.moe_layers[-1]

    class NextTokensFirstLayer:
        def predict(self, layer, hidden):
            return [(first, [0, 1])] if layer == last else []

    try:
        lm.runtime.prefetcher.predictor = NextTokensFirstLayer()
        cfg = SamplingConfig(max_new_tokens=2, temperature=0, ignore_eos=True)
        done = generate(lm, PROMPT, cfg)  # two forwards: the second's first layer is scored
        assert done.stats.prediction_precision is not None
        before = scored(lm.cache, first)
        assert sum(before) > 0
        done = generate(lm, PROMPT, SamplingConfig(max_new_tokens=1, temperature=0, ignore_eos=True))
        assert scored(lm.cache, first) == before  # one forward, nothing predicted in it
        assert done.stats.prediction_precision is None and done.stats.prediction_recall is None
    finally:
        lm.close()
