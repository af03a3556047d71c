"""Transfer engines: move one expert row from the host store into one device slot.

Three engines share one interface (:class:`TransferEngine`):

* :class:`InlineCopy` copies in the caller's thread, at once. The simplest link, used
  on the CPU when nothing is prefetched and no link is emulated.
* :class:`ThreadedLink` is a link played by one worker thread: copies run one at a time,
  on-demand (urgent) copies ahead of queued prefetches, and an optional emulated link
  makes each copy take ``latency + bytes / bandwidth`` of wall-clock, so the overlap of
  copies with compute can be measured on any machine.
* :class:`CudaStreamCopy` issues copies from pinned host memory on a dedicated CUDA
  stream, with events so compute waits on the GPU only for the slots it uses.

Who may write a slot is decided by :class:`runtime.expert_cache.ExpertCache` on the main
thread: it never hands out a slot that compute still reads (pinned) or that a copy is
writing (in flight), so the engines need no locks on slot data.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

import torch

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


@dataclass(eq=False)
class Ticket:
    """One copy of ``src`` (host row) into ``dst`` (device slot ``slot``)."""

    src: torch.Tensor
    dst: torch.Tensor
    slot: int
    layer: int
    urgent: bool
    seq: int
    state: str = QUEUED
    event: object = None  # torch.cuda.Event (CudaStreamCopy) or the gate Lock (ThreadedLink)
    copy_s: float = 0.0  # wall-clock of the copy itself (CPU engines)
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.src.numel() * self.src.element_size()


class TransferEngine(ABC):
    name: str = "?"

    def __init__(self) -> None:
        self._seq = itertools.count()

    @abstractmethod
    def submit(self, src: torch.Tensor, dst: torch.Tensor, slot: int, layer: int, urgent: bool) -> Ticket:
        """Queue a copy; urgent (on-demand) copies go ahead of queued prefetches."""

    @abstractmethod
    def is_done(self, ticket: Ticket) -> bool:
        """Has the copy completed (as far as compute on the device is concerned)?"""

    @abstractmethod
    def wait(self, ticket: Ticket) -> float:
        """Make compute wait for ``ticket``; promote it if still queued. Returns host stall seconds."""

    @abstractmethod
    def cancel(self, ticket: Ticket) -> bool:
        """Drop a copy that has not started. True if dropped (nothing was moved)."""

    def slot_released(self, slot: int) -> None:
        """Compute has issued its last read of ``slot`` for now."""

    def deferred_stall(self) -> dict[int, float]:
        """Stall seconds measured after the fact (CUDA events), per layer, since the last call."""
        return {}

    def synchronize(self) -> None:
        """Wait for every copy issued so far."""

    def close(self) -> None:
        pass


class InlineCopy(TransferEngine):
    """Copy at submit time, in the caller's thread (optionally sleeping to emulate a link)."""

    name = "inline"

    def __init__(self, bandwidth: float | None = None, latency: float = 0.0) -> None:
        super().__init__()
        self.bandwidth = bandwidth
        self.latency = latency

    def submit(self, src, dst, slot, layer, urgent):
        t = Ticket(src, dst, slot, layer, urgent, next(self._seq))
        t0 = time.perf_counter()
        dst.copy_(src)
        _emulate(t0, t.nbytes, self.bandwidth, self.latency)
        t.copy_s = time.perf_counter() - t0
        t.state = DONE
        return t

    def is_done(self, ticket):
        return True

    def wait(self, ticket):
        """The copy already ran inside ``submit``, on the compute path: that time was the stall."""
        stall, ticket.copy_s = ticket.copy_s, 0.0  # reported once
        return stall

    def cancel(self, ticket):
        return False


def _emulate(t0: float, nbytes: int, bandwidth: float | None, latency: float) -> None:
    """Sleep until ``latency + nbytes / bandwidth`` has passed since ``t0``."""
    if bandwidth is None and latency <= 0:
        return
    target = latency + (nbytes / bandwidth if bandwidth else 0.0)
    remaining = target - (time.perf_counter() - t0)
    if remaining > 0:
        time.sleep(remaining)


# How long a waiting thread sleeps before it looks again without being woken. Wake-ups are
# normally prompt; this bounds what one lost to a KeyboardInterrupt can cost (see below).
_POLL_S = 0.05


class ThreadedLink(TransferEngine):
    """A link played by one worker thread (CPU device, or any device without streams).

    Rules: one copy at a time, like one PCIe link; urgent tickets first, then FIFO; a
    queued ticket can be cancelled or promoted to urgent (``wait`` promotes). With
    ``bandwidth``/``latency`` set, each copy lasts ``latency + nbytes / bandwidth``
    seconds of wall-clock (the copy itself, then a sleep for the rest), so a slow link
    can be emulated and overlap measured. Torch copies and sleeps release the GIL, so
    the worker overlaps with compute on the main thread.

    Ctrl-C may raise KeyboardInterrupt in the main thread between any two bytecodes,
    including inside ``threading.Condition``'s Python code, which can then leave its
    lock held or released twice. So the main thread touches only primitives written in
    C, whose calls an interrupt cannot split: ``with self._lock`` (a plain Lock) around
    the queue and ticket states, a ``SimpleQueue`` doorbell to wake the worker, and a
    per-ticket Lock (``gate``) held until the copy is done. Every wait has a timeout
    and looks at the ticket's state again, so a wake-up lost to an interrupt costs at
    most ``_POLL_S``, never a hang. The worker itself never sees KeyboardInterrupt.
    """

    name = "thread"

    def __init__(self, bandwidth: float | None = None, latency: float = 0.0) -> None:
        super().__init__()
        self.bandwidth = bandwidth
        self.latency = latency
        self._heap: list[tuple[int, int, Ticket]] = []
        self._lock = threading.Lock()
        self._bell: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._closed = False
        self._running: Ticket | None = None  # popped from the heap, being copied
        self._started = itertools.count()  # order in which copies start (ticket.meta["started"])
        self._worker = threading.Thread(target=self._run, name="promoe-link", daemon=True)
        self._worker.start()

    def submit(self, src, dst, slot, layer, urgent):
        if self._closed:
            raise RuntimeError("the link is closed")
        gate = threading.Lock()
        gate.acquire()  # released by the worker once the copy is done
        t = Ticket(src, dst, slot, layer, urgent, next(self._seq), event=gate)
        with self._lock:
            heapq.heappush(self._heap, (0 if urgent else 1, t.seq, t))
        self._bell.put(None)
        return t

    def _next(self) -> Ticket | None:
        with self._lock:
            while self._heap:
                _, _, t = heapq.heappop(self._heap)
                if t.state == QUEUED:  # else cancelled, or a stale entry of a promoted ticket
                    t.state = RUNNING
                    t.meta["started"] = next(self._started)
                    self._running = t
                    return t
        return None

    def _run(self) -> None:
        while not self._closed:
            t = self._next()
            if t is None:
                with contextlib.suppress(queue.Empty):
                    self._bell.get(timeout=_POLL_S)
                continue
            t0 = time.perf_counter()
            try:
                t.dst.copy_(t.src)
                _emulate(t0, t.nbytes, self.bandwidth, self.latency)
            except Exception as exc:  # noqa: BLE001 - handed to the waiter, which raises it
                t.meta["error"] = exc
            t.copy_s = time.perf_counter() - t0
            with self._lock:
                t.state = DONE
                self._running = None
            t.event.release()

    def is_done(self, ticket):
        """Copied, and copied well: a failed copy is never done (``wait`` raises its error)."""
        return ticket.state == DONE and "error" not in ticket.meta

    def _wait_for(self, tickets: list[Ticket]) -> None:
        """Wait for every ticket to end; then raise the first failed copy's error, if any."""
        self._bell.put(None)  # wakes a worker whose wake-up an interrupt swallowed
        for t in tickets:
            while t.state in (QUEUED, RUNNING):
                if not self._worker.is_alive():
                    raise RuntimeError("the link's worker has stopped (was the link closed?)")
                t.event.acquire(timeout=_POLL_S)  # never released again: the state says DONE
        failed = next((t for t in tickets if "error" in t.meta), None)
        if failed is not None:
            raise RuntimeError(f"copying an expert of layer {failed.layer} failed") from failed.meta["error"]

    def wait(self, ticket):
        if ticket.state == CANCELLED:
            raise RuntimeError("waited on a cancelled copy: its slot was never written")
        if self.is_done(ticket):
            return 0.0
        with self._lock:
            if ticket.state == QUEUED and not ticket.urgent:
                ticket.urgent = True  # re-queue ahead of the prefetches; the old entry is skipped
                heapq.heappush(self._heap, (0, ticket.seq, ticket))
        t0 = time.perf_counter()
        self._wait_for([ticket])
        return time.perf_counter() - t0

    def cancel(self, ticket):
        with self._lock:
            if ticket.state == QUEUED:
                ticket.state = CANCELLED
                return True
        return False

    def synchronize(self) -> None:
        with self._lock:
            pending = [t for _, _, t in self._heap]
            if self._running is not None:
                pending.append(self._running)
        self._wait_for(pending)

    def close(self) -> None:
        self._closed = True
        self._bell.put(None)
        self._worker.join(timeout=5)


class CudaStreamCopy(TransferEngine):
    """Pinned host rows -> device slots on one dedicated CUDA copy stream.

    Stream rules, all enforced here:

    1. Every expert copy runs on ``self.stream``, never on the compute stream.
    2. Before a copy writes slot ``s``, the copy stream waits on ``free[s]``, an event the
       compute stream records right after the last kernel that read slot ``s``
       (:meth:`slot_released`): a slot is reused only after the compute that read it
       has finished.
    3. After a copy, its ticket's event is recorded on the copy stream; compute waits on
       that event on the GPU (:meth:`wait`, ``current_stream().wait_event``), only for
       the slots it uses. The host does not block.
    4. At most ``window`` prefetch copies sit on the stream at once; the rest wait in a
       host queue, so an on-demand copy enters the stream behind at most ``window``
       prefetches (jumps the queue) and queued prefetches can still be cancelled.
    5. Stall time is measured with a pair of events around each GPU-side wait and
       collected later (:meth:`deferred_stall`), so measuring it adds no host sync.
    """

    name = "cuda-stream"

    def __init__(self, device: torch.device, num_slots: int, window: int = 2) -> None:
        super().__init__()
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.window = window
        self._free = [torch.cuda.Event() for _ in range(num_slots)]
        self._pending: deque[Ticket] = deque()  # prefetches not yet on the stream
        self._inflight: deque[Ticket] = deque()  # prefetches on the stream
        self._stall_pairs: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def _issue(self, t: Ticket) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self._free[t.slot])  # rule 2
            t.dst.copy_(t.src, non_blocking=True)
            t.event.record(self.stream)  # rule 3
        t.state = RUNNING

    def _pump(self) -> None:
        while self._inflight and self._inflight[0].event.query():
            self._inflight.popleft().state = DONE
        while self._pending and len(self._inflight) < self.window:
            t = self._pending[0]  # issued before it leaves the queue: an interrupt never strands it
            if t.state == QUEUED:
                self._issue(t)
                self._inflight.append(t)
            self._pending.popleft()

    def submit(self, src, dst, slot, layer, urgent):
        t = Ticket(
            src, dst, slot, layer, urgent, next(self._seq), event=torch.cuda.Event(enable_timing=False)
        )
        if urgent:
            self._issue(t)
        else:
            self._pending.append(t)
        self._pump()
        return t

    def is_done(self, ticket):
        if ticket.state == RUNNING and ticket.event.query():
            ticket.state = DONE
        return ticket.state == DONE

    def wait(self, ticket):
        if ticket.state == CANCELLED:
            raise RuntimeError("waited on a cancelled copy: its slot was never written")
        if ticket.state == QUEUED:  # promote: straight onto the stream, then out of the queue
            ticket.urgent = True
            self._issue(ticket)
            self._discard(ticket)
        if not self.is_done(ticket):
            compute = torch.cuda.current_stream(self.device)
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(compute)
            compute.wait_event(ticket.event)
            after.record(compute)
            self._stall_pairs.append((ticket.layer, before, after))
        self._pump()
        return 0.0

    def cancel(self, ticket):
        if ticket.state == QUEUED:
            ticket.state = CANCELLED
            self._discard(ticket)
            return True
        return False

    def _discard(self, ticket: Ticket) -> None:
        with contextlib.suppress(ValueError):  # already out (an interrupted earlier removal)
            self._pending.remove(ticket)

    def slot_released(self, slot: int) -> None:
        self._free[slot].record(torch.cuda.current_stream(self.device))

    def deferred_stall(self) -> dict[int, float]:
        out: dict[int, float] = {}
        keep = []
        for layer, before, after in self._stall_pairs:
            if after.query():
                out[layer] = out.get(layer, 0.0) + before.elapsed_time(after) / 1e3
            else:
                keep.append((layer, before, after))
        self._stall_pairs = keep
        return out

    def synchronize(self) -> None:
        while self._pending:
            self._pump()
            self.stream.synchronize()
        self.stream.synchronize()
        self._pump()
