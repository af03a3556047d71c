"""Measure this machine for a device profile: memory, the host-to-device link, compute, dequantization.

Rules every measurement follows: warm up first, repeat, and keep the median. On the CPU,
and for pageable copies (they block the host), the host clock is read around each call.
On CUDA, asynchronous work is timed by events on its stream, several calls in a row a
sample (:func:`gpu_seconds`): host-clock timing around a synchronize would add the launch
and sync overhead to work that takes microseconds. Conventions:

* link bandwidth: bytes copied host -> device per second, for pinned and pageable host
  buffers at expert-like sizes (1, 4, 16, 64, 256 MB); the profile keeps the largest;
* per-copy latency: the time of one 4 KiB copy (what a copy costs beyond its bytes); on
  CUDA each of 20 copies issued back to back, as a stream of expert pieces pays it;
* device bandwidth: memory traffic of a device-to-device copy, read + write, so it is
  comparable to a datasheet's peak;
* compute: a square matmul in the dtype promoe computes in (bf16 on CUDA, fp32 on CPU);
* dequantization: weights per second that ``fmt.dequantize`` produces for an
  expert-shaped ``[4096, 1024]`` weight, for every registered format.

Without CUDA the CPU is the device: the "link" is a host memory copy, device memory is
host memory (one pool), and pinned copies do not apply; :attr:`ProbeResult.not_applicable`
says so.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

import torch

from runtime.device_profile import DeviceProfile, Figure

MB = 10**6
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds the whole machine and this process had used, at a wall-clock time."""

    wall: float
    machine_busy: float  # every core's non-idle seconds, summed
    own: float  # this process's (all its threads')
    cores: int

    @classmethod
    def now(cls) -> CpuSample:
        import psutil

        t = psutil.cpu_times()  # Linux's guest times are inside user and nice already
        busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
        own = psutil.Process().cpu_times()
        return cls(time.perf_counter(), busy, own.user + own.system, psutil.cpu_count() or 1)


def others_cpu_share(before: CpuSample, after: CpuSample) -> float:
    """The share of the machine's CPU time (0 to 1) that other processes used between two samples."""
    capacity = (after.wall - before.wall) * after.cores
    if capacity <= 0:
        return 0.0
    others = (after.machine_busy - before.machine_busy) - (after.own - before.own)
    return min(max(others / capacity, 0.0), 1.0)


BUSY_SHARE = 0.25  # other processes using more of the CPUs than this make CPU timings unreliable


def others_cpu_share_now(seconds: float = 0.5) -> float:
    """The share of the machine's CPU time other processes use while this one waits ``seconds``."""
    before = CpuSample.now()
    time.sleep(seconds)
    return others_cpu_share(before, CpuSample.now())


@dataclass(frozen=True)
class ProbeSettings:
    sizes: tuple[int, ...] = (1 * MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB)
    warmup: int = 2
    repeats: int = 5
    latency_repeats: int = 50
    matmul_n: int = 2048
    dequant_shape: tuple[int, int] = (4096, 1024)
    quick: bool = False


QUICK = ProbeSettings(sizes=(1 * MB, 4 * MB, 16 * MB), warmup=1, repeats=3, latency_repeats=20, matmul_n=512,
                      dequant_shape=(1024, 256), quick=True)  # fmt: skip


@dataclass
class CopyResult:
    size: int  # bytes
    pinned: bool
    seconds: float  # median of one copy

    @property
    def bandwidth(self) -> float:
        return self.size / self.seconds


@dataclass
class ProbeResult:
    device: str  # "cuda:0" or "cpu"
    device_name: str
    unified: bool
    device_memory: int
    device_free: int
    host_memory: int
    host_available: int
    copies: list[CopyResult]
    latency: float  # seconds per small copy
    device_bandwidth: float  # bytes/s, read + write
    matmul_flops: float
    matmul_dtype: str
    dequant: dict[str, float]  # format -> weights/s
    settings: ProbeSettings
    not_applicable: list[str] = field(default_factory=list)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def link_bandwidth(self, pinned: bool) -> float | None:
        """Bandwidth of the largest copy of that kind, or None if it was not measured."""
        rows = [c for c in self.copies if c.pinned == pinned]
        return max(rows, key=lambda c: c.size).bandwidth if rows else None

    def to_profile(self, name: str) -> DeviceProfile:
        quick = " (--quick)" if self.settings.quick else ""
        src = f"measured: promoe profile-device{quick} on {date.today().isoformat()}, {self.device_name}"
        cuda = self.device_type == "cuda"
        link = self.link_bandwidth(pinned=cuda)
        figures = {
            "device_memory": Figure(self.device_memory, f"{src}; total"),
            "reserved_memory": Figure(self.device_memory - self.device_free,
                                      f"{src}; total - free when measured (driver, context, other processes)"),
            "host_memory": Figure(self.host_memory, f"{src}; total"),
            "link_bandwidth": Figure(link, f"{src}; {'pinned host-to-device' if cuda else 'host memory'} copy of "
                                           f"{max(c.size for c in self.copies) // MB} MB"),
            "link_latency": Figure(self.latency, f"{src}; 4 KiB copies{' back to back' if cuda else ''}"),
            "device_bandwidth": Figure(self.device_bandwidth, f"{src}; device-to-device copy, read + write"),
            "compute": Figure(self.matmul_flops, f"{src}; {self.settings.matmul_n}^2 matmul in {self.matmul_dtype}"),
        }  # fmt: skip
        if cuda:
            pageable = self.link_bandwidth(pinned=False)
            figures["link_bandwidth_pageable"] = Figure(pageable, f"{src}; pageable host-to-device copy")
        shape = "x".join(map(str, self.settings.dequant_shape))
        return DeviceProfile(name, f"{self.device_name}, measured by promoe profile-device{quick}", self.device_type,
                             self.unified, figures, dict(self.dequant), f"{src}; weights/s dequantizing {shape}")  # fmt: skip


def median_seconds(fn: Callable[[], object], sync: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median wall-clock of ``fn`` after ``warmup`` calls, synchronizing before each clock read."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_seconds(fn: Callable[[], object], warmup: int, repeats: int, inner: int = 1) -> float:
    """Median GPU time of ``fn`` on the current CUDA stream, from events around ``inner`` calls
    in a row (divided by ``inner``). Host-clock timing around a synchronize would add the
    launch and sync overhead (several microseconds) to work that takes tens of them: a small
    matmul or copy on a fast GPU would read several times too slow."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def _timer(dev: torch.device, sync, s: ProbeSettings, inner: int = 1, repeats: int | None = None):
    """``time(fn)``: GPU events on CUDA (``inner`` calls a sample), the host clock on the CPU."""
    n = repeats or s.repeats
    if dev.type == "cuda":
        return lambda fn: gpu_seconds(fn, s.warmup, n, inner)
    return lambda fn: median_seconds(fn, sync, s.warmup, n)


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _memory(device: torch.device) -> tuple[str, bool, int, int, int, int]:
    import psutil

    vm = psutil.virtual_memory()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        props = torch.cuda.get_device_properties(device)
        return props.name, bool(getattr(props, "is_integrated", False)), total, free, vm.total, vm.available
    return _cpu_name(), True, vm.total, vm.available, vm.total, vm.available


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
            else:
                name = platform.processor() or platform.machine()
    except OSError:
        name = platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cores)"


def _copies(dev: torch.device, s: ProbeSettings, sync, step) -> list[CopyResult]:
    """Host -> device copies at each size: pinned and pageable on CUDA, a memory copy on the CPU."""
    kinds = (True, False) if dev.type == "cuda" else (False,)
    results = []
    for size in s.sizes:
        dst = torch.empty(size, dtype=torch.uint8, device=dev)
        for pinned in kinds:
            src = torch.ones(size, dtype=torch.uint8, pin_memory=pinned)
            if pinned:  # asynchronous: GPU events, several copies a sample for the small sizes
                t = _timer(dev, sync, s, inner=max(1, 64 * MB // size))(
                    lambda d=dst, x=src: d.copy_(x, non_blocking=True)
                )
            else:  # a pageable copy blocks the host: its host-clock time is what a user waits
                t = median_seconds(lambda d=dst, x=src: d.copy_(x), sync, s.warmup, s.repeats)
            results.append(CopyResult(size, pinned, t))
            step()
    return results


def _latency(dev: torch.device, s: ProbeSettings, sync) -> float:
    cuda = dev.type == "cuda"
    src = torch.ones(4096, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(4096, dtype=torch.uint8, device=dev)
    if cuda:  # each of 20 small copies back to back, as a stream of expert pieces pays it
        return gpu_seconds(
            lambda: dst.copy_(src, non_blocking=True), s.warmup, max(5, s.latency_repeats // 10), 20
        )
    return median_seconds(lambda: dst.copy_(src), sync, s.warmup, s.latency_repeats)


def _device_bandwidth(dev: torch.device, s: ProbeSettings, sync) -> float:
    """Read + write traffic of a device-to-device copy of the largest size."""
    size = max(s.sizes)
    a = torch.ones(size, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * size / _timer(dev, sync, s)(lambda: b.copy_(a))


def _matmul(dev: torch.device, dtype: torch.dtype, s: ProbeSettings, sync) -> float:
    n = s.matmul_n
    x = torch.randn(n, n, device=dev, dtype=dtype)
    y = torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / _timer(dev, sync, s, inner=10)(lambda: x @ y)


def _dequant(dev: torch.device, dtype: torch.dtype, formats: list[str], s: ProbeSettings, sync, step,
             na: list[str]) -> dict:  # fmt: skip
    """Weights per second each format's reference dequantizer produces on an expert-shaped
    weight. A format whose library is missing (nf4 without bitsandbytes) is noted in ``na``."""
    from quant import get_format

    w = torch.randn(*s.dequant_shape, device=dev)
    rates = {}
    for name in formats:
        fmt = get_format(name)
        try:
            parts = fmt.quantize(w)
            t = _timer(dev, sync, s, inner=5)(lambda f=fmt, p=parts: f.dequantize(p, w.shape, dtype))
        except ImportError as exc:
            na.append(f"dequantize {name}: {exc.name or exc} is not installed")
            step()
            continue
        except RuntimeError as exc:  # bitsandbytes without a native library for this CUDA: raises here
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            na.append(f"dequantize {name}: failed on this device ({first})")
            step()
            continue
        rates[name] = w.numel() / t
        step()
    return rates


def probe_device(device: str = "auto", settings: ProbeSettings | None = None,
                 progress: ProgressFn | None = None) -> ProbeResult:  # fmt: skip
    """Measure ``device`` (see module doc). ``progress(desc, done, total)`` is called per step."""
    from quant import available_formats

    s = settings or ProbeSettings()
    from runtime.loader import pick_device

    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cuda = dev.type == "cuda"
    sync = _sync_fn(dev)
    if cuda:
        torch.empty(1, device=dev)  # create the context first: it is part of what the driver keeps
    name, unified, total, free, host_total, host_avail = _memory(dev)
    formats = [f for f in available_formats() if f != "none"]  # "none" has nothing to dequantize
    steps = len(s.sizes) * (2 if cuda else 1) + 3 + len(formats)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress("Measuring this device", done, steps)

    na = []
    if not cuda:
        na.append("pinned copies: no CUDA device; the link is a host memory copy (pageable)")
        na.append(
            "device memory is host memory (one pool): reserved = what the OS and other processes use now"
        )
        na.append("compute in float32: bf16 matmuls are several times slower on CPUs without AMX")
    dtype = torch.bfloat16 if cuda else torch.float32
    copies = _copies(dev, s, sync, step)
    latency = _latency(dev, s, sync)
    step()
    device_bw = _device_bandwidth(dev, s, sync)
    step()
    flops = _matmul(dev, dtype, s, sync)
    step()
    dequant = _dequant(dev, dtype, formats, s, sync, step, na)
    return ProbeResult(str(dev), name, unified, total, free, host_total, host_avail, copies, latency, device_bw,
                       flops, str(dtype).removeprefix("torch."), dequant, s, na)  # fmt: skip
