"""CudaStreamCopy's host-side bookkeeping, on the CPU with a stand-in for torch.cuda.

The GPU side (real streams, events, pinned copies) is tested in test_cuda.py, which needs
a GPU. Here the copies run at once on CPU tensors, the stand-in events complete when the
test says so, and each stand-in stream logs the events it was told to wait on. So what
reaches which stream, and when, can be read from the slots and the logs: on-demand copies
go on their own stream and never behind prefetches, every call into the engine refills
the prefetch stream from its queue, a copy into a slot waits for compute's last read of
it and for the last copy into it, and only a prefetch none of whose bytes was issued can
be cancelled, wherever Ctrl-C lands.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from runtime import transfer
from runtime.transfer import CudaStreamCopy
from tests.helpers import interrupt_at_line


class FakeGPU:
    def __init__(self) -> None:
        self.recorded: list[FakeEvent] = []
        self.synced: list[FakeStream] = []  # the streams synchronized, in order
        self.compute = FakeStream(name="compute")

    def finish(self) -> None:
        """Everything put on a stream so far has run."""
        for e in self.recorded:
            e.complete = True


class FakeEvent:
    gpu: FakeGPU

    def __init__(self, enable_timing: bool = False) -> None:
        self.complete = False
        self.was_recorded = False
        self.stream = None

    def record(self, stream=None) -> None:
        self.was_recorded, self.complete, self.stream = True, False, stream
        self.gpu.recorded.append(self)

    def query(self) -> bool:
        return self.complete or not self.was_recorded  # as CUDA: an event never recorded is complete

    def elapsed_time(self, other) -> float:
        return 0.0


class FakeStream:
    gpu: FakeGPU

    def __init__(self, device=None, priority: int = 0, name: str = "") -> None:
        self.priority, self.name = priority, name
        self.waits: list[FakeEvent] = []

    def wait_event(self, event) -> None:
        self.waits.append(event)

    def synchronize(self) -> None:
        self.gpu.synced.append(self)
        self.gpu.finish()


@pytest.fixture
def gpu(monkeypatch):
    g = FakeGPU()
    FakeEvent.gpu = FakeStream.gpu = g
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: g.compute)
    return g


def engine(**kw) -> CudaStreamCopy:
    return CudaStreamCopy(torch.device("cuda"), num_slots=8, **kw)


def rows(n: int, nbytes: int = 16384):
    """``n`` host rows of distinct bytes and their empty slots (16 KiB: 4 pieces of 4 KiB)."""
    src = [torch.full((nbytes,), i + 1, dtype=torch.uint8) for i in range(n)]
    return src, [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(n)]


def landed(dst: torch.Tensor) -> int:
    """Pieces of 4 KiB written so far."""
    return int((dst.reshape(-1, 4096) != 0).any(dim=1).sum())


def test_on_demand_copies_have_their_own_stream_and_never_queue_behind_prefetches(gpu):
    eng = engine(window=1, window_bytes=0, chunks=4)
    assert transfer.PREFETCH_CHUNKS == 4
    assert eng.urgent.priority < eng.stream.priority  # lower number: higher priority
    src, dst = rows(4)
    a = eng.submit(src[0], dst[0], slot=0, layer=0, urgent=False)
    b = eng.submit(src[1], dst[1], slot=1, layer=0, urgent=False)
    assert (landed(dst[0]), landed(dst[1])) == (4, 0)  # a on the prefetch stream, b queued
    assert a.event.stream is eng.stream and len(a.meta["bounds"]) == 5  # in 4 pieces
    u = eng.submit(src[2], dst[2], slot=2, layer=1, urgent=True)
    assert landed(dst[2]) == 4 and u.event.stream is eng.urgent and len(u.meta["bounds"]) == 2
    assert eng.cancel(b) and b.state == "cancelled"  # none of its bytes was issued
    assert not eng.cancel(a)  # on the stream
    assert not eng.is_done(a) and not eng.is_done(u)  # issued, not yet run
    gpu.finish()
    assert eng.is_done(a) and eng.is_done(u)
    with pytest.raises(RuntimeError, match="cancelled"):
        eng.wait(b)
    eng.synchronize()
    assert landed(dst[1]) == 0  # the cancelled copy never ran
    assert torch.equal(dst[0], src[0]) and torch.equal(dst[2], src[2])


def test_every_call_into_the_engine_refills_the_prefetch_stream(gpu):
    """The copy engine must not idle while prefetches wait in the queue: finished prefetches
    make room at is_done, slot_released and deferred_stall too, not only at submit and wait
    (the host calls those several times per layer while the GPU computes)."""
    eng = engine(window=1, window_bytes=0)
    src, dst = rows(5)
    t = [eng.submit(src[i], dst[i], slot=i, layer=0, urgent=False) for i in range(4)]
    assert [landed(d) for d in dst[:4]] == [4, 0, 0, 0]
    eng.is_done(t[0])  # still running: nothing moves up
    assert landed(dst[1]) == 0
    gpu.finish()
    assert eng.is_done(t[0]) and landed(dst[1]) == 4
    gpu.finish()
    eng.slot_released(0)
    assert landed(dst[2]) == 4
    gpu.finish()
    eng.deferred_stall()
    assert landed(dst[3]) == 4


def test_the_prefetch_window_counts_copies_and_bytes(gpu):
    eng = engine(window=1, window_bytes=40 * 1024)
    src, dst = rows(5)
    for i in range(5):
        eng.submit(src[i], dst[i], slot=i, layer=0, urgent=False)
    # admitted while under one copy or under 40 KiB on the stream: 0 B, 16 KiB, 32 KiB
    assert [landed(d) for d in dst] == [4, 4, 4, 0, 0]
    assert len(eng._inflight) == 3 and len(eng._pending) == 2
    eng.synchronize()
    assert all(torch.equal(d, s) for d, s in zip(dst, src, strict=True))


def test_a_copy_into_a_slot_waits_for_compute_and_for_the_last_copy_into_it(gpu):
    """Rule 2 across the two streams: when the cache reuses a slot whose prefetch it waited
    for on the GPU only, the on-demand copy (another stream) must still come after it."""
    eng = engine()
    src, dst = rows(3)
    p = eng.submit(src[0], dst[0], slot=5, layer=0, urgent=False)
    assert eng.stream.waits == [eng._free[5]]  # nothing was copied into slot 5 before
    u = eng.submit(src[1], dst[0], slot=5, layer=0, urgent=True)
    assert eng.urgent.waits == [eng._free[5], p.event]
    eng.slot_released(5)
    assert eng._free[5].stream is gpu.compute
    eng.submit(src[2], dst[0], slot=5, layer=0, urgent=False)
    assert eng.stream.waits[-2:] == [eng._free[5], u.event]


def test_a_prefetch_waited_on_goes_to_the_urgent_stream_if_still_queued(gpu):
    eng = engine(window=1, window_bytes=0)
    src, dst = rows(3)
    c = eng.submit(src[0], dst[0], slot=0, layer=0, urgent=False)
    d = eng.submit(src[1], dst[1], slot=1, layer=0, urgent=False)
    assert (landed(dst[0]), landed(dst[1])) == (4, 0)
    eng.wait(d)  # promoted: onto the urgent stream now, out of the queue
    assert landed(dst[1]) == 4 and d.event.stream is eng.urgent and d.urgent
    assert d not in eng._pending and not eng.cancel(d)
    assert gpu.compute.waits == [d.event]  # compute waits for it on the GPU, the host does not
    eng.wait(c)  # already on the prefetch stream: compute waits for its event
    assert gpu.compute.waits == [d.event, c.event]
    eng.synchronize()
    assert eng.is_done(c) and eng.is_done(d)
    assert torch.equal(dst[0], src[0]) and torch.equal(dst[1], src[1])
    small = eng.submit(src[2][:100], dst[2][:100], slot=2, layer=0, urgent=False)
    assert len(small.meta["bounds"]) == 2  # a row under one piece is one piece


def test_cuda_stream_copy_survives_an_interrupt_at_every_line(gpu):
    """Ctrl-C can land between any two lines of the engine. Raise KeyboardInterrupt at each
    line reached in turn, then do what recover() does (cancel the prefetches, synchronize):
    every copy the caller holds is either cancelled with its slot untouched or done with its
    bytes in place."""

    def scenario(eng, srcs, dsts, held):
        for i in range(5):
            held.append(eng.submit(srcs[i], dsts[i], slot=i, layer=0, urgent=i == 3))
        eng.cancel(held[4])
        gpu.finish()
        eng.is_done(held[0])  # admits held[1]
        eng.wait(held[2])  # promotes it
        gpu.finish()
        eng.slot_released(0)
        eng.synchronize()

    n, interrupted_runs = 0, 0
    while True:
        n += 1
        gpu.recorded.clear()
        eng = engine(window=1, window_bytes=0)
        srcs, dsts = rows(5)
        held: list = []
        with interrupt_at_line(n, "transfer.py") as run:
            scenario(eng, srcs, dsts, held)
        for t in held:
            if not t.urgent:
                eng.cancel(t)
        eng.synchronize()
        for i, t in enumerate(held):
            if t.state == "cancelled":
                assert not dsts[i].any(), f"interrupt at line {n}: a cancelled copy wrote its slot"
            else:
                assert eng.is_done(t), f"interrupt at line {n}: copy {i} never completes"
                assert torch.equal(dsts[i], srcs[i])
        if run.finished:
            break
        interrupted_runs += 1
        assert n < 2000
    assert interrupted_runs > 30  # the scenario really ran through many interrupt points


def test_close_drops_queued_prefetches_and_waits_for_issued_copies(gpu):
    """The store's pinned rows are unregistered once the model is closed: no copy may still
    be reading them then, and nothing queued may start."""
    eng = engine(window=1, window_bytes=0, chunks=4)
    src, dst = rows(3)
    a = eng.submit(src[0], dst[0], slot=0, layer=0, urgent=False)  # on the stream
    b = eng.submit(src[1], dst[1], slot=1, layer=0, urgent=False)  # queued behind it
    u = eng.submit(src[2], dst[2], slot=2, layer=1, urgent=True)
    assert not a.event.query() and not u.event.query()
    eng.close()
    assert eng.stream in gpu.synced and eng.urgent in gpu.synced  # both copy streams waited for
    assert a.event.query() and u.event.query()
    assert b.state == "cancelled" and not eng._pending
    assert landed(dst[1]) == 0


def test_a_copy_outside_the_slots_runs_on_the_compute_stream_and_counts_as_stall(gpu):
    """The stream buffer (and a low-bit copy) is written on the compute stream, between its
    reads, with no wait on the copy streams; the time it holds compute is the layer's stall."""
    eng = engine()
    src, dst = rows(1)
    assert eng.copy_now(src[0], dst[0], layer=3) == 0.0  # measured later, with no host sync
    assert torch.equal(dst[0], src[0])
    before, after = gpu.recorded[-2:]
    assert before.stream is after.stream is gpu.compute
    assert gpu.compute.waits == [] and eng.deferred_stall() == {}  # not run yet
    gpu.finish()
    assert eng.deferred_stall() == {3: 0.0}  # the stand-in's events take no time


def test_hurry_moves_a_queued_prefetch_to_the_urgent_stream_without_making_compute_wait(gpu):
    eng = engine(window=1, window_bytes=0, chunks=4)
    src, dst = rows(3)
    eng.submit(src[0], dst[0], slot=0, layer=0, urgent=False)  # on the prefetch stream
    b = eng.submit(src[1], dst[1], slot=1, layer=0, urgent=False)  # queued on the host
    assert landed(dst[1]) == 0
    eng.hurry(b)
    assert landed(dst[1]) == 4 and b.event.stream is eng.urgent and b.urgent
    assert gpu.compute.waits == []  # compute waits only when it uses it (wait)
    eng.hurry(b)  # issued already: nothing more happens
    assert not eng.cancel(b)
    gpu.finish()
    assert eng.is_done(b)
