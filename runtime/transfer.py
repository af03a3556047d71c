"""Transfer engines: move one expert row from the host store into one device slot.

Three engines share one interface (:class:`TransferEngine`):

* :class:`InlineCopy` copies in the caller's thread, at once: the CPU with no link to
  model.
* :class:`EmulatedLink` models a host-to-device link of a given bandwidth and per-copy
  latency on the CPU, as a timeline on the wall clock (no thread): one piece at a time
  (a prefetch is several pieces), on-demand (urgent) copies ahead of queued prefetches,
  each piece lasting ``latency + bytes / bandwidth``, while compute goes on, so the
  overlap of copies with compute can be measured on any machine.
* :class:`CudaStreamCopy` issues copies from pinned host memory on a dedicated CUDA
  stream, with events so compute waits on the GPU only for the slots it uses.

Who may write a slot is decided by :class:`runtime.expert_cache.ExpertCache` on the main
thread: it never hands out a slot that compute still reads (pinned) or that a copy is
writing (in flight), so the engines need no locks on slot data.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
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
    event: object = None  # torch.cuda.Event (CudaStreamCopy)
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

    def hurry(self, ticket: Ticket) -> None:
        """Compute will need ``ticket`` soon: let it go ahead of the prefetches, and of the
        on-demand copies submitted after this call, without making compute wait yet."""

    def slot_released(self, slot: int) -> None:
        """Compute has issued its last read of ``slot`` for now."""

    def deferred_stall(self) -> dict[int, float]:
        """Stall seconds measured after the fact (CUDA events), per layer, since the last call."""
        return {}

    def synchronize(self) -> None:
        """Wait for every copy issued so far."""

    def copy_now(self, src: torch.Tensor, dst: torch.Tensor, layer: int) -> float:
        """Copy into a buffer outside the slots (a low-bit copy on a miss), ready for the
        compute issued next; returns host stall seconds. Compute reads ``dst`` in order
        after this, and earlier reads of ``dst`` come before the copy."""
        dst.copy_(src, non_blocking=True)  # on the compute stream: ordered with its reads
        return 0.0

    def close(self) -> None:
        pass


class InlineCopy(TransferEngine):
    """Copy at submit time, in the caller's thread: no link to model (the CPU, nothing emulated)."""

    name = "inline"

    def submit(self, src, dst, slot, layer, urgent):
        t = Ticket(src, dst, slot, layer, urgent, next(self._seq))
        dst.copy_(src)
        t.state = DONE
        return t

    def is_done(self, ticket):
        return True

    def wait(self, ticket):
        return 0.0

    def cancel(self, ticket):
        return False


# Prefetch copies are split into this many pieces (ProMoE's chunked prefetch): an on-demand
# copy then waits behind at most one piece of a prefetch, not a whole expert.
PREFETCH_CHUNKS = 4
_CHUNK_ALIGN = 4096


def chunk_bounds(nbytes: int, chunks: int) -> list[int]:
    """Byte offsets ``[0, ..., nbytes]`` splitting a row into at most ``chunks`` pieces
    (4 KiB-aligned, none empty)."""
    bounds = [0]
    for i in range(1, chunks):
        b = -(-(i * nbytes // chunks) // _CHUNK_ALIGN) * _CHUNK_ALIGN
        if bounds[-1] < b < nbytes:
            bounds.append(b)
    bounds.append(nbytes)
    return bounds


class EmulatedLink(TransferEngine):
    """A host-to-device link of a given bandwidth and per-copy latency, kept as a timeline.

    A GPU's copy engine moves bytes while the compute units work and costs them nothing.
    This engine plays one with no thread at all: it keeps the link's timeline on the
    wall clock, brought up to the present whenever the engine is asked anything
    (:meth:`_advance`). The link moves one piece at a time, like one PCIe link. An
    on-demand (urgent) copy is one piece; a prefetch is ``chunks`` pieces (ProMoE's
    chunked prefetch), so an on-demand copy that arrives while a prefetch is moving waits
    for that piece only. When the link is free it takes the next piece: urgent copies
    first, then prefetches in submission order (a prefetch begun is finished first). A
    piece lasts ``latency + its bytes / bandwidth``. A copy's bytes are written into its
    slot when its last piece ends, before anyone may read them (the cache reads a slot
    only after ``is_done`` or ``wait``). ``wait`` promotes the copy to urgent (its pieces
    left then go in one run) and sleeps until it ends: that sleep is the stall. A copy
    no piece of which has moved can be cancelled.

    An earlier version played the link with a worker thread. On a machine with few cores
    that thread's wake-ups preempted torch's compute threads, which then waited for each
    other: about 7 ms per token on the bundled model on 2 cores, more than prefetch saved.
    A copy engine costs compute nothing, and neither does this one, except the memory copy
    itself (about 10 us for one bundled-model expert).

    Ctrl-C can land between any two bytecodes. A copy's progress is one tuple, replaced
    in one assignment after what it depends on (the bytes are written before the last
    piece is counted, the link's free time before a piece's end is forgotten), and every
    step can be repeated, so an interrupted step is redone at the next call. Nothing can
    hang.
    """

    name = "emulated"

    def __init__(self, bandwidth: float | None = None, latency: float = 0.0, *, chunks: int = PREFETCH_CHUNKS,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        super().__init__()
        self.bandwidth = bandwidth
        self.latency = latency
        self.chunks = max(int(chunks), 1)
        self._clock, self._sleep = clock, sleep  # tests drive a fake clock
        self._open: list[Ticket] = []  # not yet done or cancelled, in submission order
        self._free_at = 0.0  # when the link ended its last piece
        self._started = itertools.count()  # order in which copies start (ticket.meta["started"])
        self._closed = False

    def duration(self, nbytes: int) -> float:
        """One piece of ``nbytes`` on the link."""
        return self.latency + (nbytes / self.bandwidth if self.bandwidth else 0.0)

    def submit(self, src, dst, slot, layer, urgent):
        if self._closed:
            raise RuntimeError("the link is closed")
        now = self._clock()
        self._advance(now)
        t = Ticket(src, dst, slot, layer, urgent, next(self._seq))
        t.meta["submitted"] = now
        t.meta["bounds"] = chunk_bounds(t.nbytes, 1 if urgent else self.chunks)
        t.meta["progress"] = (0, None)  # (pieces moved, (pieces, end) of the run on the link)
        self._open = [*self._open, t]
        self._advance(now)
        return t

    def _on_link(self) -> Ticket | None:
        """The copy whose piece(s) the link is moving, if any."""
        return next((t for t in self._open if t.meta["progress"][1] is not None), None)

    def _advance(self, now: float) -> None:
        """Bring the timeline up to ``now``: end the pieces due, start the next ones."""
        while True:
            on_link = self._on_link()
            if on_link is not None:
                moved, (n, end) = on_link.meta["progress"]
                if end > now:
                    return
                if moved + n == len(on_link.meta["bounds"]) - 1:
                    try:
                        on_link.dst.copy_(on_link.src)
                    except Exception as exc:  # noqa: BLE001 - handed to the waiter, which raises it
                        on_link.meta["error"] = exc
                self._free_at = end
                on_link.meta["progress"] = (moved + n, None)
                continue
            for t in self._open:  # every piece moved: done (redone if an interrupt cut this short)
                if t.state == RUNNING and t.meta["progress"][0] == len(t.meta["bounds"]) - 1:
                    t.state = DONE
            waiting = [t for t in self._open if t.state in (QUEUED, RUNNING)]
            self._open = waiting  # done and cancelled copies leave
            if not waiting:
                return
            # every waiting copy was submitted before the link freed (each submit advances
            # first), so the link picks among all of them: urgent first, then in order
            nxt = min(waiting, key=lambda t: (not t.urgent, t.seq))
            moved = nxt.meta["progress"][0]
            start = max(self._free_at, nxt.meta["submitted"])
            if nxt.state == QUEUED:
                nxt.meta["started"] = next(self._started)
                nxt.state = RUNNING
            bounds = nxt.meta["bounds"]
            n = len(bounds) - 1 - moved if nxt.urgent else 1  # urgent: the pieces left in one run
            end = start + sum(self.duration(bounds[i + 1] - bounds[i]) for i in range(moved, moved + n))
            nxt.meta["progress"] = (moved, (n, end))

    def is_done(self, ticket):
        """Copied, and copied well: a failed copy is never done (``wait`` raises its error)."""
        if ticket.state in (QUEUED, RUNNING):
            self._advance(self._clock())
        return ticket.state == DONE and "error" not in ticket.meta

    def _sleep_until_done(self, tickets: list[Ticket]) -> None:
        while True:
            now = self._clock()
            self._advance(now)
            if all(t.state not in (QUEUED, RUNNING) for t in tickets):
                break
            on_link = self._on_link()
            if on_link is not None:  # else an interrupted step left nothing moving: advance redoes it
                self._sleep(max(on_link.meta["progress"][1][1] - now, 0.0))
        failed = next((t for t in tickets if "error" in t.meta), None)
        if failed is not None:
            raise RuntimeError(f"copying an expert of layer {failed.layer} failed") from failed.meta["error"]

    def hurry(self, ticket):
        if ticket.state in (QUEUED, RUNNING):
            self._advance(self._clock())
            ticket.urgent = True  # the link takes it next, and its pieces left in one run

    def wait(self, ticket):
        if ticket.state == CANCELLED:
            raise RuntimeError("waited on a cancelled copy: its slot was never written")
        t0 = self._clock()
        if ticket.state in (QUEUED, RUNNING):
            self._advance(t0)
            ticket.urgent = True  # the link takes it next, and its pieces left in one run
        self._sleep_until_done([ticket])
        return self._clock() - t0

    def cancel(self, ticket):
        if ticket.state == QUEUED:
            self._advance(self._clock())  # it may have started by now
            if ticket.state == QUEUED:
                ticket.state = CANCELLED
                return True
        return False

    def synchronize(self) -> None:
        self._sleep_until_done(list(self._open))

    def copy_now(self, src, dst, layer):
        """Over the link like any on-demand copy: after the piece in progress, ahead of prefetches."""
        return self.wait(self.submit(src, dst, slot=-1, layer=layer, urgent=True))

    def close(self) -> None:
        self._closed = True


class CudaStreamCopy(TransferEngine):
    """Pinned host rows -> device slots on two dedicated CUDA copy streams.

    Stream rules, all enforced here:

    1. Expert copies never run on the compute stream. Prefetches go on ``self.stream``;
       on-demand copies, and prefetches waited on before any of their bytes were issued,
       go on ``self.urgent``, a stream of their own, so an on-demand copy never queues
       behind prefetches (ProMoE's early preemption). Its higher priority orders kernels
       only (CUDA's stream priorities do not apply to memory copies): where both streams
       share one copy engine, what bounds its wait is that the prefetch stream holds at most
       ``window`` prefetches (``window_bytes``), each moving in ``chunks`` pieces (ProMoE's
       chunked prefetch), refilled at every call into the engine.
    2. Before a copy writes slot ``s``, its stream waits on ``free[s]``, an event the
       compute stream records right after the last kernel that read slot ``s``
       (:meth:`slot_released`), and on the event after the last copy into ``s`` (which
       may have run on the other stream): a slot is reused only after the compute that
       read it, and the copies that wrote it, have finished.
    3. After a copy, its ticket's event is recorded on its stream; compute waits on that
       event on the GPU (:meth:`wait`, ``current_stream().wait_event``), only for the
       slots it uses. The host does not block.
    4. At most ``window`` prefetches (more while they total under ``window_bytes``) are on
       the prefetch stream at once; the rest wait in a host queue, where a stale one can
       still be cancelled. Every call into the engine refills the stream from the queue
       (:meth:`_pump`); the runtime makes several per layer (each expert's
       :meth:`is_done` and :meth:`slot_released`), so the copy engine does not sit idle
       while work is queued. A prefetch leaves the queue whole: once its first piece is
       issued it can no longer be cancelled.
    5. Stall time is measured with a pair of events around each GPU-side wait and
       collected later (:meth:`deferred_stall`), so measuring it adds no host sync.

    Ctrl-C can land anywhere. A ticket is marked running before its first piece is issued
    (so it is never cancelled with bytes on the way) and counted as issued only after its
    event is recorded (an event never recorded reads as complete); a copy issued again
    after an interrupt writes the same bytes again, which is harmless.
    """

    name = "cuda-stream"

    def __init__(
        self,
        device: torch.device,
        num_slots: int,
        window: int = 2,
        window_bytes: int = 64 << 20,
        chunks: int = PREFETCH_CHUNKS,
    ) -> None:
        super().__init__()
        self.device = device
        self.stream = torch.cuda.Stream(device=device)  # prefetches
        self.urgent = torch.cuda.Stream(device=device, priority=-1)  # on-demand copies
        self.window = max(int(window), 1)
        self.window_bytes = window_bytes
        self.chunks = max(int(chunks), 1)
        self._free = [torch.cuda.Event() for _ in range(num_slots)]
        self._written: list = [None] * num_slots  # event after the last copy into each slot
        self._pending: deque[Ticket] = deque()  # prefetches not yet on the stream
        self._inflight: deque[Ticket] = deque()  # prefetches on the stream, oldest first
        self._stall_pairs: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def _issue(self, t: Ticket, stream) -> None:
        """Put every piece of ``t`` on ``stream`` (rules 2 and 3)."""
        t.state = RUNNING  # before the first piece: never cancelled with bytes on the way
        bounds = t.meta["bounds"]
        with torch.cuda.stream(stream):
            stream.wait_event(self._free[t.slot])
            last = self._written[t.slot]
            if last is not None and last is not t.event:
                stream.wait_event(last)
            for a, b in itertools.pairwise(bounds):
                t.dst[a:b].copy_(t.src[a:b], non_blocking=True)
            t.event.record(stream)
        self._written[t.slot] = t.event
        t.meta["issued"] = True

    def _pump(self) -> None:
        """Retire finished prefetches and move queued ones onto the prefetch stream (rule 4)."""
        while self._inflight and self._inflight[0].event.query():
            self._inflight.popleft()
        while self._pending:
            t = self._pending[0]  # leaves the queue only once issued: an interrupt never strands it
            if t.state != CANCELLED and not t.meta["issued"]:
                if len(self._inflight) >= self.window and (
                    sum(x.nbytes for x in self._inflight) >= self.window_bytes
                ):
                    return
                self._issue(t, self.stream)
                self._inflight.append(t)
            self._pending.popleft()

    def submit(self, src, dst, slot, layer, urgent):
        t = Ticket(
            src, dst, slot, layer, urgent, next(self._seq), event=torch.cuda.Event(enable_timing=False)
        )
        t.meta["bounds"] = chunk_bounds(t.nbytes, 1 if urgent else self.chunks)
        t.meta["issued"] = False
        if urgent:
            self._issue(t, self.urgent)
        else:
            self._pending.append(t)
        self._pump()
        return t

    def is_done(self, ticket):
        self._pump()
        if ticket.state == RUNNING and ticket.meta["issued"] and ticket.event.query():
            ticket.state = DONE
        return ticket.state == DONE

    def hurry(self, ticket):
        if ticket.state != CANCELLED and not ticket.meta["issued"]:  # still on the host: the urgent stream
            ticket.urgent = True
            self._issue(ticket, self.urgent)
            self._discard(ticket)

    def wait(self, ticket):
        if ticket.state == CANCELLED:
            raise RuntimeError("waited on a cancelled copy: its slot was never written")
        self.hurry(ticket)
        if not self.is_done(ticket):
            compute = torch.cuda.current_stream(self.device)
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(compute)
            compute.wait_event(ticket.event)
            after.record(compute)
            self._stall_pairs.append((ticket.layer, before, after))
        return 0.0

    def cancel(self, ticket):
        if ticket.state == QUEUED:
            ticket.state = CANCELLED
            self._discard(ticket)
            return True
        return False

    def copy_now(self, src, dst, layer):
        """On the compute stream, as the base class: ordered after every earlier read of
        ``dst`` and before the reads issued next, so one buffer serves copy after copy.
        Compute waits for it all along, so its time on the stream is counted as stall
        (:meth:`deferred_stall`), as a wait for an on-demand copy is."""
        compute = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        dst.copy_(src, non_blocking=True)
        after.record(compute)
        self._stall_pairs.append((layer, before, after))
        return 0.0

    def _discard(self, ticket: Ticket) -> None:
        with contextlib.suppress(ValueError):  # already out (an interrupted earlier removal)
            self._pending.remove(ticket)

    def slot_released(self, slot: int) -> None:
        self._free[slot].record(torch.cuda.current_stream(self.device))
        self._pump()

    def deferred_stall(self) -> dict[int, float]:
        self._pump()
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
        self.urgent.synchronize()
        self._pump()

    def close(self) -> None:
        """Drop the queued prefetches and wait for every copy issued: the pinned rows they
        read are unregistered and freed once the store goes, which must not happen under
        a copy still running."""
        while self._pending:
            t = self._pending.popleft()
            if t.state == QUEUED:
                t.state = CANCELLED
        self.stream.synchronize()
        self.urgent.synchronize()
