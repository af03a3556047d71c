"""CudaStreamCopy's host-side bookkeeping, on the CPU with a stand-in for torch.cuda.

The GPU side (real streams, events, pinned copies) is tested in test_cuda.py, which needs
a GPU. Here the copies run at once on CPU tensors and the stand-in events complete when
the test says so, so what reaches the copy stream, and when, can be read from the slots:
an on-demand copy enters behind at most ``window`` prefetch pieces, prefetches move in
pieces, a waited-on prefetch has its pieces left issued at once, and only a prefetch none
of whose pieces was issued can be cancelled.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from runtime import transfer
from runtime.transfer import CudaStreamCopy


class FakeGPU:
    def __init__(self) -> None:
        self.recorded: list[FakeEvent] = []

    def finish(self) -> None:
        """Everything put on a stream so far has run."""
        for e in self.recorded:
            e.complete = True


class FakeEvent:
    gpu: FakeGPU

    def __init__(self, enable_timing: bool = False) -> None:
        self.complete = False
        self.was_recorded = False

    def record(self, stream=None) -> None:
        self.was_recorded, self.complete = True, False
        self.gpu.recorded.append(self)

    def query(self) -> bool:
        return self.complete or not self.was_recorded  # as CUDA: an event never recorded is complete

    def elapsed_time(self, other) -> float:
        return 0.0


class FakeStream:
    gpu: FakeGPU

    def __init__(self, device=None) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        self.gpu.finish()


@pytest.fixture
def gpu(monkeypatch):
    g = FakeGPU()
    FakeEvent.gpu = FakeStream.gpu = g
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    return g


def rows(n: int, nbytes: int = 16384):
    """``n`` host rows of distinct bytes and their empty slots (16 KiB: 4 pieces of 4 KiB)."""
    src = [torch.full((nbytes,), i + 1, dtype=torch.uint8) for i in range(n)]
    return src, [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(n)]


def landed(dst: torch.Tensor) -> int:
    """Pieces of 4 KiB written so far."""
    return int((dst.reshape(-1, 4096) != 0).any(dim=1).sum())


def test_on_demand_copies_enter_behind_at_most_window_prefetch_pieces(gpu):
    eng = CudaStreamCopy(torch.device("cuda"), num_slots=8, window=2, chunks=4)
    assert transfer.PREFETCH_CHUNKS == 4
    src, dst = rows(6)
    a = eng.submit(src[0], dst[0], slot=0, layer=0, urgent=False)
    b = eng.submit(src[1], dst[1], slot=1, layer=0, urgent=False)
    assert (landed(dst[0]), landed(dst[1])) == (2, 0)  # two pieces of a on the stream, b waits
    u = eng.submit(src[2], dst[2], slot=2, layer=1, urgent=True)
    assert landed(dst[2]) == 4 and len(eng._inflight) == 2  # on-demand: all at once, behind 2 pieces
    assert eng.cancel(b) and b.state == "cancelled"  # no piece of it was issued
    assert not eng.is_done(a)
    gpu.finish()
    assert eng.is_done(u)
    assert not eng.is_done(a)  # its last pieces are not even issued yet
    eng.submit(src[3], dst[3], slot=3, layer=0, urgent=False)  # any call pumps the queue
    assert landed(dst[0]) == 4 and landed(dst[3]) == 0  # a's last two pieces went first
    gpu.finish()
    assert eng.is_done(a) and torch.equal(dst[0], src[0])
    with pytest.raises(RuntimeError, match="cancelled"):
        eng.wait(b)
    eng.synchronize()
    assert torch.equal(dst[3], src[3]) and landed(dst[1]) == 0  # the cancelled copy never ran


def test_a_prefetch_waited_on_is_issued_at_once_and_can_no_longer_be_cancelled(gpu):
    eng = CudaStreamCopy(torch.device("cuda"), num_slots=8, window=2, chunks=4)
    src, dst = rows(3)
    c = eng.submit(src[0], dst[0], slot=0, layer=0, urgent=False)
    d = eng.submit(src[1], dst[1], slot=1, layer=0, urgent=False)
    assert (landed(dst[0]), landed(dst[1])) == (2, 0)
    eng.wait(d)  # promoted: every piece of it onto the stream now, ahead of c's last pieces
    assert landed(dst[1]) == 4 and landed(dst[0]) == 2
    assert d not in eng._pending and d.urgent
    assert not eng.cancel(c)  # half of it is on the stream
    eng.synchronize()
    assert eng.is_done(c) and eng.is_done(d)
    assert torch.equal(dst[0], src[0]) and torch.equal(dst[1], src[1])
    small = eng.submit(src[2][:100], dst[2][:100], slot=2, layer=0, urgent=False)
    assert len(small.meta["bounds"]) == 2  # a row under one piece is one piece
